import CoreGraphics
import CoreML
import Foundation

/// Where a generation is, for a progress bar.
public struct GenerationProgress: Sendable, Equatable {
    public enum Phase: Sendable, Equatable {
        /// Compiling (first use only) and loading the named component.
        case loading(String)
        case encodingText
        case denoising
        case decoding
    }

    public let phase: Phase
    /// UNet steps finished so far, 0...totalSteps.
    public let step: Int
    public let totalSteps: Int
}

/// One image and how it was made.
public struct GenerationResult: @unchecked Sendable {
    public let image: CGImage
    /// The decoded image [3,H,W] in [-1, 1] before 8-bit conversion.
    public let decoded: [Float]
    /// The sampler's final latents [1,C,h,w].
    public let latents: [Float]
    public let seed: UInt64
    public let steps: Int
    public let scheduler: SchedulerKind
    /// Sampling and decoding, as `sun-edge generate` counts it (text encoding and model loading excluded).
    public let seconds: Double
    public let unetCalls: Int
    public let unetSeconds: Double
}

/// Prompt to image with a sun-edge Core ML bundle: the CLIP tokenizer, the text encoder, torch-compatible noise,
/// SUN's single-forward UNet in the NumPy-equal sampler (DDIM, 4 trailing steps by default) and the VAE decoder.
///
///     let pipeline = try SUNPipeline(bundleAt: bundleURL, computeUnits: .cpuAndGPU)
///     let image = try await pipeline.generate(prompt: "a cat", negativePrompt: "blurry", seed: 0)
///
/// Each `.mlpackage` is compiled with `MLModel.compileModel(at:)` the first time it is used and the `.mlmodelc`
/// is cached (keyed by the sha256 values in the manifest); models load lazily. With `reduceMemory` each model is
/// unloaded as soon as its phase is over (text encoder, UNet, decoder), as ml-stable-diffusion's option of that
/// name does: slower, but only one model is in memory at a time (iOS). ``unloadResources()`` frees everything.
public actor SUNPipeline {
    public nonisolated let bundleURL: URL
    public nonisolated let manifest: BundleManifest
    public nonisolated let tokenizer: CLIPTokenizer
    public nonisolated let computeUnits: ComputeUnits
    public nonisolated let reduceMemory: Bool

    private let cache: CompiledModelCache
    private let verifyHashes: Bool
    private var models: [String: MLModel] = [:]

    /// The components a bundle must have; `vae_encoder` (img2img) is optional.
    public static let requiredComponents = ["text_encoder", "unet", "vae_decoder"]

    /// Open a bundle folder: its manifest (format, version, target), every listed file present with its recorded
    /// size, the components and their shapes, the tokenizer. Nothing is compiled or loaded yet.
    ///
    /// - Parameters:
    ///   - computeUnits: the hardware Core ML may use (`.cpuAndNeuralEngine` for split-einsum bundles).
    ///   - reduceMemory: unload each model once its phase is over.
    ///   - cacheDirectory: where compiled models are kept (default: the user's caches directory).
    ///   - verifyHashes: also check every file's sha256 before compiling it (slow for big UNets).
    public init(bundleAt url: URL, computeUnits: ComputeUnits = .all, reduceMemory: Bool = false,
                cacheDirectory: URL? = nil, verifyHashes: Bool = false) throws {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw SUNEdgeError.missingFile(path: url.path, hint: "point SUNPipeline at a bundle folder exported with "
                + "`sun-edge export --target coreml`")
        }
        let manifest = try BundleManifest.load(bundle: url)
        try Self.checkFiles(of: manifest, in: url)
        try Self.checkShapes(of: manifest)
        self.bundleURL = url
        self.manifest = manifest
        self.tokenizer = try CLIPTokenizer(bundle: url, manifest: manifest)
        self.computeUnits = computeUnits
        self.reduceMemory = reduceMemory
        self.cache = CompiledModelCache(directory: cacheDirectory ?? CompiledModelCache.defaultDirectory())
        self.verifyHashes = verifyHashes
    }

    // MARK: - Generation

    /// One image from `prompt`, the negative prompt steering away inside the UNet (SUN: one call per step).
    ///
    /// - Parameters:
    ///   - seed: the same image as `sun-edge generate --seed` (torch-compatible noise; only the low 32 bits count).
    ///   - steps: default the manifest's (4 for SUN).
    ///   - scheduler: default the manifest's (`ddim`); `dpmpp_2m` runs DPM-Solver++ 2M with the SUN UNet.
    ///   - progress: called as loading, text encoding, each UNet step and decoding finish.
    /// - Throws: ``SUNEdgeError`` saying what is wrong, or `CancellationError` when the task is cancelled.
    public func generate(prompt: String, negativePrompt: String = "", seed: UInt64 = 0, steps: Int? = nil,
                         scheduler: SchedulerKind? = nil,
                         progress: (@Sendable (GenerationProgress) -> Void)? = nil) async throws -> CGImage {
        try await generateDetailed(prompt: prompt, negativePrompt: negativePrompt, seed: seed, steps: steps,
                                   scheduler: scheduler, progress: progress).image
    }

    /// ``generate(prompt:negativePrompt:seed:steps:scheduler:progress:)`` with the latents, decoded values and timings.
    public func generateDetailed(prompt: String, negativePrompt: String = "", seed: UInt64 = 0, steps: Int? = nil,
                                 scheduler: SchedulerKind? = nil,
                                 progress: (@Sendable (GenerationProgress) -> Void)? = nil) async throws
        -> GenerationResult {
        let kind = try scheduler ?? SchedulerKind(named: manifest.scheduler.name)
        let (defaultSteps, spacingName) = defaults(for: kind)
        let stepCount = steps ?? defaultSteps
        guard stepCount >= 1 else {
            throw SUNEdgeError.invalidArgument("steps must be at least 1, got \(stepCount)")
        }
        let spacing = try Spacing(named: spacingName)
        _ = try Sampler.plan(kind, steps: stepCount, spacing: spacing)  // a bad step count fails before any work

        progress?(GenerationProgress(phase: .encodingText, step: 0, totalSteps: stepCount))
        let positive = try await embed(prompt, progress: progress, totalSteps: stepCount)
        let negative = try await embed(negativePrompt, progress: progress, totalSteps: stepCount)
        if reduceMemory { unload("text_encoder") }
        try Task.checkCancellation()

        _ = try await model("unet", progress: progress, totalSteps: stepCount)  // loaded (compiled) before timing
        let latentShape = try manifest.component("unet").inputs[0].shape
        let noise = TorchNoise.randn(seed: seed, shape: latentShape)
        let start = Date()
        var unetCalls = 0
        var unetSeconds = 0.0
        let latents = try await Sampler.sample(kind, noise: noise, steps: stepCount, spacing: spacing, eps: { x, t in
            let callStart = Date()
            defer {
                unetCalls += 1
                unetSeconds += Date().timeIntervalSince(callStart)
            }
            return try await self.unetStep(x, t, positive, negative)
        }, progress: { done, total in
            progress?(GenerationProgress(phase: .denoising, step: done, totalSteps: total))
        })
        if reduceMemory { unload("unet") }
        try Task.checkCancellation()

        let decoder = try await model("vae_decoder", progress: progress, totalSteps: stepCount)
        progress?(GenerationProgress(phase: .decoding, step: stepCount, totalSteps: stepCount))
        let decoded = try predict(decoder, component: "vae_decoder", entry: try manifest.component("vae_decoder"),
                                  inputs: [latents])
        if reduceMemory { unload("vae_decoder") }
        guard decoded.allSatisfy(\.isFinite) else {
            throw SUNEdgeError.nonFinite(step: stepCount, what: "the decoded image's values")
        }
        let image = try ImageConversion.cgImage(fromCHW: decoded, height: manifest.image.height,
                                                width: manifest.image.width)
        return GenerationResult(image: image, decoded: decoded, latents: latents, seed: seed, steps: stepCount,
                                scheduler: kind, seconds: Date().timeIntervalSince(start), unetCalls: unetCalls,
                                unetSeconds: unetSeconds)
    }

    /// One SUN forward: eps for latents [1,C,h,w] at timestep `t`, given both prompts' embeddings.
    private func unetStep(_ latents: [Float], _ t: Float, _ positive: [Float], _ negative: [Float]) async throws
        -> [Float] {
        let unet = try await model("unet", progress: nil, totalSteps: 0)
        return try predict(unet, component: "unet", entry: try manifest.component("unet"),
                           inputs: [latents, [t], positive, negative])
    }

    /// The text embedding [1,77,D] of `text` (token ids as int32, as the Core ML text encoder takes them).
    public func embed(_ text: String) async throws -> [Float] {
        try await embed(text, progress: nil, totalSteps: 0)
    }

    // MARK: - Models

    /// Compile (first use) and load every component now, e.g. behind a launch screen.
    public func prewarm() async throws {
        for name in Self.requiredComponents {
            _ = try await model(name, progress: nil, totalSteps: 0)
            if reduceMemory { unload(name) }
        }
    }

    /// Drop every loaded model (they load again on the next call); compiled models stay cached on disk.
    public func unloadResources() {
        models.removeAll()
    }

    /// The components whose models are loaded now.
    public var loadedComponents: [String] { models.keys.sorted() }

    private func unload(_ name: String) {
        models[name] = nil
    }

    private func model(_ name: String, progress: (@Sendable (GenerationProgress) -> Void)?,
                       totalSteps: Int) async throws -> MLModel {
        if let loaded = models[name] {
            return loaded
        }
        progress?(GenerationProgress(phase: .loading(name), step: 0, totalSteps: totalSteps))
        let entry = try manifest.component(name)
        if verifyHashes {
            for (file, digest) in entry.sha256.sorted(by: { $0.key < $1.key }) {
                let url = bundleURL.appendingPathComponent(file)
                if try sha256(of: url) != digest {
                    throw SUNEdgeError.hashMismatch(path: url.path)
                }
            }
        }
        let compiled = try await cache.compiledModel(of: entry, package: bundleURL.appendingPathComponent(entry.file),
                                                     component: name)
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits.coreML
        let model: MLModel
        do {
            model = try await MLModel.load(contentsOf: compiled, configuration: configuration)
        } catch {
            throw SUNEdgeError.coreML(component: name, stage: "load", underlying: error.localizedDescription)
        }
        try checkInterface(of: model, component: name, entry: entry)
        models[name] = model
        return model
    }

    private func embed(_ text: String, progress: (@Sendable (GenerationProgress) -> Void)?,
                       totalSteps: Int) async throws -> [Float] {
        let encoder = try await model("text_encoder", progress: progress, totalSteps: totalSteps)
        let entry = try manifest.component("text_encoder")
        let ids = tokenizer.encode(text, maxLength: manifest.text.tokens)
        // Token ids travel as Float like every other input (exact below 2^24); predict feeds them as int32.
        return try predict(encoder, component: "text_encoder", entry: entry, inputs: [ids.map(Float.init)])
    }

    /// Run `model` on `inputs` (row-major values, in the manifest's input order) and return its first output.
    private func predict(_ model: MLModel, component: String, entry: ComponentEntry,
                         inputs: [[Float]]) throws -> [Float] {
        guard inputs.count == entry.inputs.count else {
            throw SUNEdgeError.modelInterfaceMismatch(component: component, detail: "\(inputs.count) inputs given, "
                + "the manifest lists \(entry.inputs.count)")
        }
        var features: [String: MLFeatureValue] = [:]
        for (spec, values) in zip(entry.inputs, inputs) {
            let count = spec.shape.reduce(1, *)
            guard values.count == count else {
                throw SUNEdgeError.shapeMismatch(what: "\(component) input \(spec.name)", expected: spec.shape,
                                                 found: [values.count])
            }
            let array: MLMultiArray
            switch spec.dtype {
            case "int32": array = try MLMultiArray.int32(values.map { Int($0) }, shape: spec.shape)
            case "float32": array = try MLMultiArray.float32(values, shape: spec.shape)
            default:
                throw SUNEdgeError.modelInterfaceMismatch(component: component, detail: "input \(spec.name) has dtype "
                    + "\(spec.dtype); SUNEdgeKit feeds int32 and float32")
            }
            features[spec.name] = MLFeatureValue(multiArray: array)
        }
        let output: MLFeatureProvider
        do {
            output = try model.prediction(from: try MLDictionaryFeatureProvider(dictionary: features))
        } catch {
            throw SUNEdgeError.coreML(component: component, stage: "run", underlying: error.localizedDescription)
        }
        guard let first = entry.outputs.first, let array = output.featureValue(for: first.name)?.multiArrayValue else {
            throw SUNEdgeError.modelInterfaceMismatch(component: component, detail: "no output "
                + "\(entry.outputs.first?.name ?? "(none listed)")")
        }
        let values = array.floatValues()
        guard values.count == first.shape.reduce(1, *) else {
            throw SUNEdgeError.shapeMismatch(what: "\(component) output \(first.name)", expected: first.shape,
                                             found: array.shape.map(\.intValue))
        }
        return values
    }

    /// Steps and spacing for `kind`: the manifest's SUN defaults, or its baseline's when `kind` is the baseline's.
    private nonisolated func defaults(for kind: SchedulerKind) -> (Int, String) {
        if kind.rawValue == manifest.scheduler.name {
            return (manifest.scheduler.steps, manifest.scheduler.spacing)
        }
        if kind.rawValue == manifest.baseline.name {
            return (manifest.baseline.steps, manifest.baseline.spacing)
        }
        return (manifest.scheduler.steps, manifest.scheduler.spacing)
    }

    // MARK: - Checks at open

    /// Every file the manifest lists is present with its recorded size (as sun-edge's `open_bundle` checks).
    static func checkFiles(of manifest: BundleManifest, in bundle: URL) throws {
        for name in requiredComponents {
            _ = try manifest.component(name)
        }
        var expected: [String: Int] = [manifest.tokenizer.vocab: -1, manifest.tokenizer.merges: -1]
        for entry in manifest.components.values {
            for (file, size) in entry.files { expected[file] = size }
        }
        for (file, size) in expected.sorted(by: { $0.key < $1.key }) {
            let url = bundle.appendingPathComponent(file)
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: url.path) else {
                throw SUNEdgeError.missingFile(path: url.path, hint: "the bundle is incomplete: re-export it")
            }
            let found = (attributes[.size] as? NSNumber)?.intValue ?? -1
            if size >= 0, found != size {
                throw SUNEdgeError.fileSizeMismatch(path: url.path, found: found, expected: size)
            }
        }
    }

    /// The components have the SUN signatures (DESIGN.md): text encoder ids [1,T] -> [1,T,D]; UNet sample [1,C,h,w],
    /// timestep [1], two embeddings [1,T,D] -> eps [1,C,h,w]; decoder latents [1,C,h,w] -> image [1,3,H,W].
    static func checkShapes(of manifest: BundleManifest) throws {
        let latent = [1, manifest.latent.channels, manifest.latent.height, manifest.latent.width]
        let embedding = [1, manifest.text.tokens, manifest.text.dim]
        let image = [1, 3, manifest.image.height, manifest.image.width]
        let expected: [(String, [[Int]], [Int])] = [
            ("text_encoder", [[1, manifest.text.tokens]], embedding),
            ("unet", [latent, [1], embedding, embedding], latent),
            ("vae_decoder", [latent], image),
        ]
        for (name, inputs, output) in expected {
            let entry = try manifest.component(name)
            let have = entry.inputs.map(\.shape)
            if have != inputs || entry.outputs.first?.shape != output {
                throw SUNEdgeError.modelInterfaceMismatch(component: name, detail: "manifest.json lists inputs \(have) "
                    + "and output \(entry.outputs.first?.shape ?? []), SUNEdgeKit expects \(inputs) -> \(output) "
                    + "(a SUN UNet takes the negative prompt's embedding as its own input)")
            }
        }
    }
}
