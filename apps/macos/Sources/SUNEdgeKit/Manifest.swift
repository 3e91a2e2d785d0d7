import Foundation

/// The parts of a sun-edge bundle's `manifest.json` that SUNEdgeKit reads (sun_edge/bundle.py writes it).
///
/// Every stored property below is read from the JSON key its `CodingKeys` names; sun-edge's test
/// `tests/test_swift_package.py` reads these declarations and checks each key against a real Core ML manifest.
public struct BundleManifest: Codable, Sendable {
    public static let format = "sun-edge-bundle"
    public static let supportedFormatVersion = 1
    public static let fileName = "manifest.json"

    public let format: String
    public let formatVersion: Int
    public let target: String
    public let precision: String
    public let image: ImageGeometry
    public let latent: LatentGeometry
    public let text: TextGeometry
    public let components: [String: ComponentEntry]
    public let model: ModelEntry
    public let adapter: AdapterEntry?
    public let scheduler: SchedulerDefaults
    public let baseline: BaselineDefaults
    public let tokenizer: TokenizerFiles
    public let sunEdgeVersion: String

    enum CodingKeys: String, CodingKey {
        case format
        case formatVersion = "format_version"
        case target
        case precision
        case image
        case latent
        case text
        case components
        case model
        case adapter
        case scheduler
        case baseline
        case tokenizer
        case sunEdgeVersion = "sun_edge_version"
    }

    /// Read and check `manifest.json` in `bundle`: the format, its version and the target come first, so that
    /// an ONNX bundle or a newer format fails with the reason rather than with a missing field.
    public static func load(bundle: URL) throws -> BundleManifest {
        let url = bundle.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw SUNEdgeError.missingFile(path: url.path, hint: "\(bundle.path) is not a sun-edge bundle (export one with "
                + "`sun-edge export --target coreml`)")
        }
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw SUNEdgeError.invalidManifest(path: url.path, reason: "cannot be read (\(error.localizedDescription))")
        }
        let header: Header
        do {
            header = try JSONDecoder().decode(Header.self, from: data)
        } catch {
            throw SUNEdgeError.invalidManifest(path: url.path, reason: "not a sun-edge bundle manifest (\(describe(error)))")
        }
        guard header.format == format else {
            throw SUNEdgeError.invalidManifest(path: url.path,
                                               reason: "not a sun-edge bundle manifest (format is not \"\(format)\")")
        }
        guard header.formatVersion == supportedFormatVersion else {
            throw SUNEdgeError.unsupportedFormatVersion(found: header.formatVersion ?? -1, supported: supportedFormatVersion)
        }
        guard header.target == "coreml" else {
            throw SUNEdgeError.wrongTarget(found: header.target ?? "unknown", supported: "coreml")
        }
        do {
            return try JSONDecoder().decode(BundleManifest.self, from: data)
        } catch {
            throw SUNEdgeError.invalidManifest(path: url.path, reason: "\(describe(error)); the manifest was edited or is "
                + "incomplete: re-export the bundle")
        }
    }

    /// The component `name`, or an error listing those the bundle has.
    public func component(_ name: String) throws -> ComponentEntry {
        guard let entry = components[name] else {
            throw SUNEdgeError.missingComponent(name: name, available: components.keys.sorted())
        }
        return entry
    }

    /// The image side over the latent side: 8 for SD1.5's VAE.
    public var vaeScaleFactor: Int { image.height / max(latent.height, 1) }

    /// The first fields, decoded leniently to report format problems precisely.
    private struct Header: Decodable {
        let format: String?
        let formatVersion: Int?
        let target: String?

        enum CodingKeys: String, CodingKey {
            case format
            case formatVersion = "format_version"
            case target
        }
    }
}

/// `manifest.image`: the (static) image size of the bundle's graphs.
public struct ImageGeometry: Codable, Sendable, Equatable {
    public let height: Int
    public let width: Int

    enum CodingKeys: String, CodingKey {
        case height
        case width
    }
}

/// `manifest.latent`: latent channels and size; the decoder applies `1 / scaling_factor` inside its graph.
public struct LatentGeometry: Codable, Sendable, Equatable {
    public let channels: Int
    public let height: Int
    public let width: Int
    public let scalingFactor: Double

    enum CodingKeys: String, CodingKey {
        case channels
        case height
        case width
        case scalingFactor = "scaling_factor"
    }
}

/// `manifest.text`: token count (77) and embedding width of the text encoder.
public struct TextGeometry: Codable, Sendable, Equatable {
    public let tokens: Int
    public let dim: Int

    enum CodingKeys: String, CodingKey {
        case tokens
        case dim
    }
}

/// One graph input or output as the manifest lists it (`shape` -1: a free dimension).
public struct TensorEntry: Codable, Sendable, Equatable {
    public let name: String
    public let dtype: String
    public let shape: [Int]

    enum CodingKeys: String, CodingKey {
        case name
        case dtype
        case shape
    }
}

/// `manifest.components[name]`: the `.mlpackage`, its I/O in call order, and every file with size and sha256.
public struct ComponentEntry: Codable, Sendable, Equatable {
    public let file: String
    public let inputs: [TensorEntry]
    public let outputs: [TensorEntry]
    public let precision: String
    public let files: [String: Int]
    public let sha256: [String: String]

    enum CodingKeys: String, CodingKey {
        case file
        case inputs
        case outputs
        case precision
        case files
        case sha256
    }
}

/// `manifest.model`: the model the graphs were made from.
public struct ModelEntry: Codable, Sendable, Equatable {
    public let name: String?
    public let sha256: String?

    enum CodingKeys: String, CodingKey {
        case name
        case sha256
    }
}

/// `manifest.adapter`: the SUN adapter fused into the UNet.
public struct AdapterEntry: Codable, Sendable, Equatable {
    public let name: String?
    public let sha256: String?

    enum CodingKeys: String, CodingKey {
        case name
        case sha256
    }
}

/// `manifest.scheduler`: the SUN sampling defaults (DDIM, trailing, 4 steps).
public struct SchedulerDefaults: Codable, Sendable, Equatable {
    public let name: String
    public let spacing: String
    public let steps: Int

    enum CodingKeys: String, CodingKey {
        case name
        case spacing
        case steps
    }
}

/// `manifest.baseline`: the CFG baseline's defaults (DPM-Solver++ 2M, 25 steps, guidance 8).
public struct BaselineDefaults: Codable, Sendable, Equatable {
    public let name: String
    public let spacing: String
    public let steps: Int
    public let guidance: Double

    enum CodingKeys: String, CodingKey {
        case name
        case spacing
        case steps
        case guidance
    }
}

/// `manifest.tokenizer`: the CLIP tokenizer files inside the bundle.
public struct TokenizerFiles: Codable, Sendable, Equatable {
    public let vocab: String
    public let merges: String

    enum CodingKeys: String, CodingKey {
        case vocab
        case merges
    }
}

private func describe(_ error: Error) -> String {
    switch error {
    case let DecodingError.keyNotFound(key, context):
        return "missing field \((context.codingPath + [key]).map(\.stringValue).joined(separator: "."))"
    case let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context):
        return "field \(context.codingPath.map(\.stringValue).joined(separator: ".")) has the wrong type"
    case let DecodingError.dataCorrupted(context):
        return "not valid JSON (\(context.debugDescription))"
    default:
        return error.localizedDescription
    }
}
