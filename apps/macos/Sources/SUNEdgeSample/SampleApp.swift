// SUNEdgeSample: a small SwiftUI macOS app over SUNEdgeKit's public API only: a bundle, a prompt, a negative
// prompt and a seed in; the image and its time out.
//
//     swift run SUNEdgeSample            # or open Package.swift in Xcode and run the SUNEdgeSample scheme
//     SUN_EDGE_BUNDLE=/path/to/bundle swift run SUNEdgeSample

import CoreGraphics
import SUNEdgeKit
import SwiftUI
#if os(macOS)
import AppKit
#endif

@main
struct SUNEdgeSampleApp: App {
    #if os(macOS)
    @NSApplicationDelegateAdaptor(AppDelegate.self) private var delegate
    #endif

    var body: some Scene {
        WindowGroup("SUN Edge") {
            ContentView()
        }
    }
}

#if os(macOS)
/// A SwiftPM executable has no Info.plist: make it a regular, focused app.
final class AppDelegate: NSObject, NSApplicationDelegate {
    func applicationDidFinishLaunching(_ notification: Notification) {
        NSApp.setActivationPolicy(.regular)
        NSApp.activate(ignoringOtherApps: true)
    }
}
#endif

/// The app's state: the open pipeline, the inputs, the last image and what happened.
@MainActor
final class GeneratorModel: ObservableObject {
    @Published var bundlePath = ProcessInfo.processInfo.environment["SUN_EDGE_BUNDLE"] ?? ""
    @Published var prompt = "a photo of an astronaut riding a horse on the moon, detailed, sharp focus"
    @Published var negativePrompt = "blurry, lowres, watermark, text"
    @Published var seed = "0"
    @Published var reduceMemory = false
    @Published private(set) var image: CGImage?
    @Published private(set) var status = "Choose a bundle exported with `sun-edge export --target coreml`."
    @Published private(set) var fraction = 0.0
    @Published private(set) var isRunning = false

    private var pipeline: SUNPipeline?
    private var task: Task<Void, Never>?

    func generate() {
        guard !isRunning else { return }
        guard let seed = UInt64(seed.trimmingCharacters(in: .whitespaces)) else {
            status = "The seed must be a whole number from 0 to 2^64 - 1."
            return
        }
        isRunning = true
        fraction = 0
        status = "Starting…"
        let prompt = prompt, negativePrompt = negativePrompt
        task = Task { [weak self] in
            guard let self else { return }
            do {
                let pipeline = try self.openPipeline()
                let result = try await pipeline.generateDetailed(
                    prompt: prompt, negativePrompt: negativePrompt, seed: seed,
                    progress: { [weak self] progress in
                        Task { @MainActor [weak self] in self?.show(progress) }
                    })
                self.image = result.image
                self.status = String(format: "%.2f s per image (%ld UNet calls, %.0f ms each), seed %llu",
                                     result.seconds, result.unetCalls,
                                     1000 * result.unetSeconds / Double(max(result.unetCalls, 1)), seed)
                self.fraction = 1
            } catch is CancellationError {
                self.status = "Cancelled."
            } catch {
                self.status = error.localizedDescription
            }
            self.isRunning = false
        }
    }

    func cancel() {
        task?.cancel()
    }

    /// Open the bundle once (again when the path or the memory option changes); models load on first use.
    private func openPipeline() throws -> SUNPipeline {
        let url = URL(fileURLWithPath: (bundlePath as NSString).expandingTildeInPath)
        if let pipeline, pipeline.bundleURL == url, pipeline.reduceMemory == reduceMemory {
            return pipeline
        }
        let opened = try SUNPipeline(bundleAt: url, computeUnits: .all, reduceMemory: reduceMemory)
        pipeline = opened
        return opened
    }

    private func show(_ progress: GenerationProgress) {
        switch progress.phase {
        case let .loading(component): status = "Loading \(component) (compiled on first use)…"
        case .encodingText: status = "Encoding the prompts…"
        case .denoising:
            status = "Step \(progress.step) of \(progress.totalSteps)…"
            fraction = Double(progress.step) / Double(max(progress.totalSteps, 1))
        case .decoding: status = "Decoding…"
        }
    }

    #if os(macOS)
    func chooseBundle() {
        let panel = NSOpenPanel()
        panel.canChooseDirectories = true
        panel.canChooseFiles = false
        panel.message = "Choose a sun-edge Core ML bundle (a folder with manifest.json)"
        if panel.runModal() == .OK, let url = panel.url {
            bundlePath = url.path
        }
    }
    #endif
}

struct ContentView: View {
    @StateObject private var model = GeneratorModel()

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            HStack {
                TextField("Bundle folder", text: $model.bundlePath)
                #if os(macOS)
                Button("Choose…") { model.chooseBundle() }
                #endif
            }
            TextField("Prompt", text: $model.prompt)
            TextField("Negative prompt", text: $model.negativePrompt)
            HStack {
                TextField("Seed", text: $model.seed)
                    .frame(width: 160)
                Toggle("Reduce memory", isOn: $model.reduceMemory)
                Spacer()
                if model.isRunning {
                    Button("Cancel") { model.cancel() }
                } else {
                    Button("Generate") { model.generate() }
                        .keyboardShortcut(.defaultAction)
                        .disabled(model.bundlePath.isEmpty)
                }
            }
            ProgressView(value: model.fraction)
            Group {
                if let image = model.image {
                    Image(decorative: image, scale: 1)
                        .resizable()
                        .interpolation(.none)
                        .aspectRatio(contentMode: .fit)
                } else {
                    Rectangle().fill(Color.gray.opacity(0.15))
                }
            }
            .frame(minWidth: 384, minHeight: 384)
            Text(model.status)
                .font(.callout)
                .foregroundColor(.secondary)
                .textSelection(.enabled)
        }
        .padding()
        .frame(minWidth: 520)
    }
}
