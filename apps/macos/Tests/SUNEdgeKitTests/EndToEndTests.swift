@testable import SUNEdgeKit
import XCTest

/// A whole generation on a Mac: the tiny-random model exported with `sun-edge export --target coreml` (the macOS
/// workflow exports it and sets SUN_EDGE_TINY_BUNDLE), compared with the image the PyTorch reference made
/// (reference.json, or SUN_EDGE_REFERENCE_JSON when the workflow regenerated it on the same Mac).
final class EndToEndTests: XCTestCase {
    struct Reference: Decodable {
        let modelSha256: String?
        let prompt: String
        let negativePrompt: String
        let seed: UInt64
        let height: Int
        let width: Int
        let steps: Int
        let scheduler: String
        let ids: [String: [Int]]
        let thresholdDb: Double
        let latents: [Float]
        let pixelsRgbBase64: String

        enum CodingKeys: String, CodingKey {
            case prompt, seed, height, width, steps, scheduler, ids, latents
            case modelSha256 = "model_sha256"
            case negativePrompt = "negative_prompt"
            case thresholdDb = "threshold_db"
            case pixelsRgbBase64 = "pixels_rgb_base64"
        }
    }

    private func fixture() throws -> (SUNPipeline, Reference, URL) {
        guard let path = ProcessInfo.processInfo.environment["SUN_EDGE_TINY_BUNDLE"] else {
            throw XCTSkip("set SUN_EDGE_TINY_BUNDLE to a tiny Core ML bundle (sun-edge export --model tiny-random "
                + "--target coreml --height 64 --width 64 -o DIR)")
        }
        let referenceURL = try ProcessInfo.processInfo.environment["SUN_EDGE_REFERENCE_JSON"]
            .map { URL(fileURLWithPath: $0) } ?? Vectors.url("reference.json")
        let reference = try JSONDecoder().decode(Reference.self, from: Data(contentsOf: referenceURL))
        let cache = FileManager.default.temporaryDirectory.appendingPathComponent("sun-edge-cache-\(UUID().uuidString)")
        let pipeline = try SUNPipeline(bundleAt: URL(fileURLWithPath: path), computeUnits: .cpuOnly, cacheDirectory: cache)
        if let sha = reference.modelSha256, pipeline.manifest.model.sha256 != sha {
            throw XCTSkip("the bundle was exported from another tiny-random (sha256 \(pipeline.manifest.model.sha256 ?? "?")"
                + " vs \(sha)); regenerate the reference on this machine: scripts/make_swift_vectors.py "
                + "--reference-only OUT.json --bundle \(path)")
        }
        return (pipeline, reference, cache)
    }

    func testImageMatchesThePythonReference() async throws {
        let (pipeline, reference, cache) = try fixture()
        defer { try? FileManager.default.removeItem(at: cache) }
        XCTAssertEqual(pipeline.tokenizer.encode(reference.prompt), reference.ids["prompt"])
        XCTAssertEqual(pipeline.tokenizer.encode(reference.negativePrompt), reference.ids["negative_prompt"])

        let phases = PhaseRecorder()
        let result = try await pipeline.generateDetailed(prompt: reference.prompt, negativePrompt: reference.negativePrompt,
                                                         seed: reference.seed, progress: { phases.append($0) })
        XCTAssertEqual(result.steps, reference.steps)
        XCTAssertEqual(result.scheduler.rawValue, reference.scheduler)
        XCTAssertEqual(result.unetCalls, reference.steps)  // SUN: one UNet call per step
        XCTAssertEqual(result.image.width, reference.width)
        XCTAssertEqual(result.image.height, reference.height)
        XCTAssertEqual(phases.steps.filter { $0 > 0 }, Array(1...reference.steps))

        let want = try XCTUnwrap(Data(base64Encoded: reference.pixelsRgbBase64))
        let got = try ImageConversion.rgbBytes(fromCHW: result.decoded, height: reference.height, width: reference.width)
        XCTAssertEqual(try ImageConversion.rgbBytes(of: result.image), got, "the CGImage holds the converted pixels")
        let toUnit = { (bytes: [UInt8]) in bytes.map { Float($0) / 127.5 - 1 } }
        let imageDB = ImageConversion.psnr(reference: toUnit(Array(want)), candidate: toUnit(got))
        let latentDB = ImageConversion.psnr(reference: reference.latents, candidate: result.latents)
        print("end to end: image \(imageDB) dB, latents \(latentDB) dB (threshold \(reference.thresholdDb) dB)")
        XCTAssertGreaterThanOrEqual(imageDB, reference.thresholdDb)
    }

    func testCancellationAndUnloading() async throws {
        let (pipeline, reference, cache) = try fixture()
        defer { try? FileManager.default.removeItem(at: cache) }
        try await pipeline.prewarm()
        let loaded = await pipeline.loadedComponents
        XCTAssertEqual(loaded, ["text_encoder", "unet", "vae_decoder"])
        await pipeline.unloadResources()
        let unloaded = await pipeline.loadedComponents
        XCTAssertEqual(unloaded, [])
        let task = Task {
            try await pipeline.generate(prompt: reference.prompt, seed: 1)
        }
        task.cancel()  // generate checks before every UNet step (and after text encoding)
        do {
            _ = try await task.value
            XCTFail("a cancelled generation must throw")
        } catch is CancellationError {
        }
    }
}

/// Collects progress reports from any thread.
final class PhaseRecorder: @unchecked Sendable {
    private let lock = NSLock()
    private var reports: [GenerationProgress] = []

    func append(_ progress: GenerationProgress) {
        lock.lock()
        reports.append(progress)
        lock.unlock()
    }

    var steps: [Int] {
        lock.lock()
        defer { lock.unlock() }
        return reports.filter { $0.phase == .denoising }.map(\.step)
    }
}
