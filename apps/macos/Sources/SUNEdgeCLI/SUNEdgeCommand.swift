// sun-edge-swift: the command-line sample. It uses SUNEdgeKit's public API only (the file is not main.swift,
// so that @main can mark the entry point).
//
//     swift run sun-edge-swift --bundle toonyou-coreml --prompt "a cat" --negative-prompt "blurry" --seed 0 -o cat.png

import Foundation
import SUNEdgeKit

struct Options {
    var bundle: URL?
    var prompt = ""
    var negativePrompt = ""
    var seed: UInt64 = 0
    var steps: Int?
    var scheduler: SchedulerKind?
    var computeUnits = ComputeUnits.all
    var reduceMemory = false
    var output = URL(fileURLWithPath: "out.png")

    static let usage = """
    usage: sun-edge-swift --bundle DIR --prompt TEXT [--negative-prompt TEXT] [--seed N] [--steps N]
                          [--scheduler ddim|dpmpp_2m] [--compute-units all|cpu-and-gpu|cpu-and-ne|cpu-only]
                          [--reduce-memory] [-o OUT.png]
    """

    static func parse(_ arguments: [String]) throws -> Options {
        var options = Options()
        var rest = arguments[...]
        func value(_ flag: String) throws -> String {
            guard let next = rest.popFirst() else { throw SUNEdgeError.invalidArgument("\(flag) needs a value") }
            return next
        }
        while let flag = rest.popFirst() {
            switch flag {
            case "--bundle": options.bundle = URL(fileURLWithPath: try value(flag))
            case "--prompt": options.prompt = try value(flag)
            case "--negative-prompt": options.negativePrompt = try value(flag)
            case "--seed":
                guard let seed = UInt64(try value(flag)) else {
                    throw SUNEdgeError.invalidArgument("--seed must be an integer from 0 to 2^64 - 1")
                }
                options.seed = seed
            case "--steps":
                guard let steps = Int(try value(flag)), steps >= 1 else {
                    throw SUNEdgeError.invalidArgument("--steps must be a positive integer")
                }
                options.steps = steps
            case "--scheduler": options.scheduler = try SchedulerKind(named: try value(flag))
            case "--compute-units":
                let name = try value(flag)
                guard let units = ComputeUnits(rawValue: name) else {
                    throw SUNEdgeError.invalidArgument("unknown compute units \(name); valid: "
                        + ComputeUnits.allCases.map(\.rawValue).joined(separator: ", "))
                }
                options.computeUnits = units
            case "--reduce-memory": options.reduceMemory = true
            case "-o", "--output": options.output = URL(fileURLWithPath: try value(flag))
            case "-h", "--help":
                print(usage)
                exit(0)
            default: throw SUNEdgeError.invalidArgument("unknown argument \(flag)\n\(usage)")
            }
        }
        guard options.bundle != nil else { throw SUNEdgeError.invalidArgument("--bundle is required\n\(usage)") }
        return options
    }
}

@main
enum SUNEdgeCommand {
    static func main() async {
        do {
            let options = try Options.parse(Array(CommandLine.arguments.dropFirst()))
            let pipeline = try SUNPipeline(bundleAt: options.bundle!, computeUnits: options.computeUnits,
                                           reduceMemory: options.reduceMemory)
            if let cut = pipeline.tokenizer.truncatedText(options.prompt) {
                FileHandle.standardError.write(Data("warning: the prompt is longer than 77 tokens; this part was cut: \(cut)\n".utf8))
            }
            let result = try await pipeline.generateDetailed(
                prompt: options.prompt, negativePrompt: options.negativePrompt, seed: options.seed,
                steps: options.steps, scheduler: options.scheduler,
                progress: { progress in
                    if progress.phase == .denoising {
                        FileHandle.standardError.write(Data("\rstep \(progress.step)/\(progress.totalSteps)".utf8))
                    } else if case let .loading(name) = progress.phase {
                        FileHandle.standardError.write(Data("loading \(name)\n".utf8))
                    }
                })
            try ImageConversion.writePNG(result.image, to: options.output)
            let perCall = result.unetSeconds / Double(max(result.unetCalls, 1))
            FileHandle.standardError.write(Data(String(format: "\n%.2f s for the image; %ld UNet calls, %.3f s each\n",
                                                       result.seconds, result.unetCalls, perCall).utf8))
            print("wrote \(options.output.path)")
        } catch {
            FileHandle.standardError.write(Data("error: \(error.localizedDescription)\n".utf8))
            exit(error is SUNEdgeError ? 2 : 1)
        }
    }
}
