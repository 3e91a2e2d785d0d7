import Foundation

/// Everything that can go wrong while opening a bundle or generating, each case saying what is wrong
/// and what to do, as sun-edge's Python errors do.
public enum SUNEdgeError: Error, Equatable, LocalizedError, Sendable {
    /// The bundle folder, or a file the manifest lists, is not there.
    case missingFile(path: String, hint: String)
    /// `manifest.json` exists but is not a sun-edge bundle manifest, or a field is missing or malformed.
    case invalidManifest(path: String, reason: String)
    /// The manifest's `format_version` is not the one this package reads.
    case unsupportedFormatVersion(found: Int, supported: Int)
    /// The bundle was exported for another target (`onnx`, `tensorrt`): this package runs `coreml` bundles.
    case wrongTarget(found: String, supported: String)
    /// The bundle lacks a component this package needs.
    case missingComponent(name: String, available: [String])
    /// A file has another size than the manifest records: it was changed after export.
    case fileSizeMismatch(path: String, found: Int, expected: Int)
    /// A file's sha256 is not the one the manifest records.
    case hashMismatch(path: String)
    /// A compiled model declares other inputs or outputs than the manifest lists.
    case modelInterfaceMismatch(component: String, detail: String)
    /// A value handed to a model has the wrong shape.
    case shapeMismatch(what: String, expected: [Int], found: [Int])
    /// The tokenizer files are unreadable or not CLIP's.
    case tokenizer(String)
    /// Core ML failed to compile, load or run a model.
    case coreML(component: String, stage: String, underlying: String)
    /// The latents stopped being finite numbers (an overflowing float16 graph, a broken bundle).
    case nonFinite(step: Int, what: String)
    /// An argument outside its range (steps, seed, scheduler name, ...).
    case invalidArgument(String)

    public var errorDescription: String? {
        switch self {
        case let .missingFile(path, hint):
            return "\(path) does not exist; \(hint)"
        case let .invalidManifest(path, reason):
            return "\(path): \(reason)"
        case let .unsupportedFormatVersion(found, supported):
            return "bundle format version \(found) is not supported (this SUNEdgeKit reads version \(supported)); "
                + "re-export the bundle with a matching sun-edge, or update SUNEdgeKit"
        case let .wrongTarget(found, supported):
            return "this is a \(found) bundle; SUNEdgeKit runs \(supported) bundles: export one with "
                + "`sun-edge export --target coreml`"
        case let .missingComponent(name, available):
            return "the bundle has no \(name) component (it has: \(available.joined(separator: ", "))); re-export it"
        case let .fileSizeMismatch(path, found, expected):
            return "\(path) has \(found) bytes, the manifest says \(expected); the file was changed after export: "
                + "re-export the bundle"
        case let .hashMismatch(path):
            return "\(path) does not match the sha256 in manifest.json; the file was changed after export: re-export the bundle"
        case let .modelInterfaceMismatch(component, detail):
            return "\(component): \(detail); re-export the bundle"
        case let .shapeMismatch(what, expected, found):
            return "\(what): expected shape [\(expected.map(String.init).joined(separator: ","))], "
                + "got [\(found.map(String.init).joined(separator: ","))]"
        case let .tokenizer(reason):
            return reason
        case let .coreML(component, stage, underlying):
            return "Core ML could not \(stage) \(component): \(underlying)"
        case let .nonFinite(step, what):
            return "\(what) are not finite after step \(step); the bundle's graphs overflow or are broken: "
                + "check it with `sun-edge parity --bundle`"
        case let .invalidArgument(reason):
            return reason
        }
    }
}
