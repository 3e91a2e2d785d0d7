@testable import SUNEdgeKit
import XCTest

/// tiny_manifest.json: the manifest `sun-edge export --model tiny-random --target coreml` writes, read as
/// SUNPipeline reads it, and the errors a wrong bundle gets.
final class ManifestTests: XCTestCase {
    private var folders: [URL] = []

    override func tearDown() {
        for folder in folders { try? FileManager.default.removeItem(at: folder) }
        folders = []
        super.tearDown()
    }

    /// A bundle folder holding only the tiny manifest, edited by `edit`.
    private func bundle(_ edit: (inout [String: Any]) -> Void = { _ in }) throws -> URL {
        var json = try JSONSerialization.jsonObject(with: Data(contentsOf: Vectors.url("tiny_manifest.json")))
            as! [String: Any]
        edit(&json)
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("sun-edge-manifest-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        folders.append(folder)
        try JSONSerialization.data(withJSONObject: json).write(to: folder.appendingPathComponent("manifest.json"))
        return folder
    }

    func testTheTinyManifestDecodes() throws {
        let manifest = try BundleManifest.load(bundle: bundle())
        XCTAssertEqual(manifest.format, "sun-edge-bundle")
        XCTAssertEqual(manifest.formatVersion, 1)
        XCTAssertEqual(manifest.target, "coreml")
        XCTAssertEqual(manifest.image, ImageGeometry(height: 64, width: 64))
        XCTAssertEqual(manifest.latent.channels, 4)
        XCTAssertEqual(manifest.vaeScaleFactor, 8)
        XCTAssertEqual(manifest.scheduler, SchedulerDefaults(name: "ddim", spacing: "trailing", steps: 4))
        XCTAssertEqual(manifest.baseline.name, "dpmpp_2m")
        let unet = try manifest.component("unet")
        XCTAssertEqual(unet.file, "Unet.mlpackage")
        XCTAssertEqual(unet.inputs.map(\.name), ["sample", "timestep", "encoder_hidden_states",
                                                 "negative_encoder_hidden_states"])
        XCTAssertEqual(unet.outputs.map(\.name), ["noise_pred"])
        XCTAssertEqual(try manifest.component("text_encoder").inputs.first?.dtype, "int32")
        XCTAssertNoThrow(try SUNPipeline.checkShapes(of: manifest))
        XCTAssertEqual(CompiledModelCache.key(for: unet).count, 64)
    }

    func testWrongFormatVersionTargetAndMissingFilesSayWhat() throws {
        let newer = try bundle { $0["format_version"] = 2 }
        XCTAssertThrowsError(try BundleManifest.load(bundle: newer)) { error in
            XCTAssertEqual(error as? SUNEdgeError, .unsupportedFormatVersion(found: 2, supported: 1))
        }
        let onnx = try bundle { $0["target"] = "onnx" }
        XCTAssertThrowsError(try BundleManifest.load(bundle: onnx)) { error in
            XCTAssertEqual(error as? SUNEdgeError, .wrongTarget(found: "onnx", supported: "coreml"))
            XCTAssertTrue(error.localizedDescription.contains("sun-edge export --target coreml"))
        }
        let notOurs = try bundle { $0["format"] = "something-else" }
        XCTAssertThrowsError(try BundleManifest.load(bundle: notOurs)) { error in
            XCTAssertTrue(error.localizedDescription.contains("not a sun-edge bundle manifest"), error.localizedDescription)
        }
        let incomplete = try bundle { $0["scheduler"] = nil }
        XCTAssertThrowsError(try BundleManifest.load(bundle: incomplete)) { error in
            XCTAssertTrue(error.localizedDescription.contains("missing field scheduler"), error.localizedDescription)
        }
        // The manifest is fine, but none of the packages it lists are there.
        XCTAssertThrowsError(try SUNPipeline(bundleAt: bundle())) { error in
            guard case .missingFile = error as? SUNEdgeError else { return XCTFail("\(error)") }
            XCTAssertTrue(error.localizedDescription.contains("re-export it"), error.localizedDescription)
        }
        XCTAssertThrowsError(try SUNPipeline(bundleAt: URL(fileURLWithPath: "/no/such/bundle"))) { error in
            XCTAssertTrue(error.localizedDescription.hasPrefix("/no/such/bundle does not exist"), error.localizedDescription)
        }
    }

    func testAUNetWithoutTheNegativeInputIsRefused() throws {
        let plain = try bundle { json in
            var components = json["components"] as! [String: Any]
            var unet = components["unet"] as! [String: Any]
            var inputs = unet["inputs"] as! [[String: Any]]
            inputs.removeLast()  // a CFG UNet: no negative_encoder_hidden_states
            unet["inputs"] = inputs
            components["unet"] = unet
            json["components"] = components
        }
        let manifest = try BundleManifest.load(bundle: plain)
        XCTAssertThrowsError(try SUNPipeline.checkShapes(of: manifest)) { error in
            XCTAssertTrue(error.localizedDescription.contains("negative prompt's embedding"), error.localizedDescription)
        }
    }
}
