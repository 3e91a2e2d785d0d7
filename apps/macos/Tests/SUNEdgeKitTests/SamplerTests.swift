@testable import SUNEdgeKit
import XCTest

/// schedules.json and trajectories.json: sun_edge.sampling's alpha_bar table, timesteps and coefficients, and whole
/// DDIM-4 (trailing) and DPM-Solver++ 2M-25 runs with an analytic function in place of the UNet.
final class SamplerTests: XCTestCase {
    struct ScheduleVectors: Decodable {
        struct Run: Decodable {
            let scheduler: String
            let spacing: String
            let steps: Int
            let timesteps: [Int]
            let alphas: [Double]
            let alphasPrev: [Double]?
            let sigmas: [Double]?

            enum CodingKeys: String, CodingKey {
                case scheduler, spacing, steps, timesteps, alphas, sigmas
                case alphasPrev = "alphas_prev"
            }
        }

        let alphasCumprod: [Double]
        let sigmas: [Double]
        let runs: [Run]

        enum CodingKeys: String, CodingKey {
            case sigmas, runs
            case alphasCumprod = "alphas_cumprod"
        }
    }

    struct TrajectoryVectors: Decodable {
        struct Call: Decodable {
            let timestep: Double
            let input: Checksums
        }

        struct Run: Decodable {
            let scheduler: String
            let spacing: String
            let steps: Int
            let calls: [Call]
            let finalLatents: [Float]
            let finalChecksums: Checksums

            enum CodingKeys: String, CodingKey {
                case scheduler, spacing, steps, calls
                case finalLatents = "final"
                case finalChecksums = "final_checksums"
            }
        }

        let seed: UInt64
        let shape: [Int]
        let runs: [Run]
    }

    /// float32(tanh(0.3 x) + (0.01 t / 1000) sin(x)) in float64, as make_swift_vectors.analytic_eps.
    static func analyticEps(_ latents: [Float], _ timestep: Float) -> [Float] {
        let c = 0.01 * (Double(timestep) / 1000.0)
        return latents.map { Float(Foundation.tanh(0.3 * Double($0)) + c * Foundation.sin(Double($0))) }
    }

    func testAlphaTableAndSigmasEqualSunEdge() throws {
        let vectors = try Vectors.load(ScheduleVectors.self, from: "schedules.json")
        let alphas = NoiseSchedule.sd15.alphasCumprod(), sigmas = NoiseSchedule.sd15.sigmas()
        XCTAssertEqual(alphas.count, 1000)
        for i in 0..<1000 {
            XCTAssertEqual(alphas[i], vectors.alphasCumprod[i], accuracy: 1e-12, "alpha_bar[\(i)]")
            XCTAssertEqual(sigmas[i], vectors.sigmas[i], accuracy: 1e-9 * vectors.sigmas[i], "sigma[\(i)]")
        }
    }

    func testTimestepsAndCoefficientsEqualSunEdge() throws {
        let vectors = try Vectors.load(ScheduleVectors.self, from: "schedules.json")
        for run in vectors.runs {
            let name = "\(run.scheduler) \(run.spacing) \(run.steps)"
            let plan = try Sampler.plan(SchedulerKind(named: run.scheduler), steps: run.steps,
                                        spacing: Spacing(named: run.spacing))
            XCTAssertEqual(plan.timesteps, run.timesteps, name)
            assertClose(plan.alphas, run.alphas, name)
            if let prev = run.alphasPrev { assertClose(plan.alphasPrev, prev, "\(name) alphas_prev") }
            if let sigmas = run.sigmas {
                XCTAssertEqual(plan.sigmas.count, sigmas.count, name)
                for (a, b) in zip(plan.sigmas, sigmas) { XCTAssertEqual(a, b, accuracy: 1e-9 * max(b, 1e-9), name) }
            }
        }
        XCTAssertEqual(try Sampler.plan(.ddim, steps: 4, spacing: .trailing).timesteps, [999, 749, 499, 249])
    }

    private func assertClose(_ a: [Double], _ b: [Double], _ name: String, file: StaticString = #filePath,
                             line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, name, file: file, line: line)
        for (x, y) in zip(a, b) {
            XCTAssertEqual(x, y, accuracy: 1e-12, name, file: file, line: line)
        }
    }

    func testTrajectoriesEqualSunEdge() async throws {
        let vectors = try Vectors.load(TrajectoryVectors.self, from: "trajectories.json")
        let noise = TorchNoise.randn(seed: vectors.seed, shape: vectors.shape)
        for run in vectors.runs {
            let name = "\(run.scheduler) \(run.spacing) \(run.steps)"
            var timesteps: [Float] = []
            var inputs: [[Float]] = []
            var reported: [Int] = []
            let latents = try await Sampler.sample(SchedulerKind(named: run.scheduler), noise: noise, steps: run.steps,
                                                 spacing: Spacing(named: run.spacing), eps: { x, t in
                timesteps.append(t)
                inputs.append(x)
                return SamplerTests.analyticEps(x, t)
            }, progress: { done, _ in reported.append(done) })
            XCTAssertEqual(timesteps.map(Double.init), run.calls.map(\.timestep), name)
            for (input, call) in zip(inputs, run.calls) {
                Checksums(of: input).assertClose(to: call.input, count: input.count, "\(name) model input")
            }
            XCTAssertEqual(reported, Array(1...run.steps), name)
            XCTAssertLessThanOrEqual(relativeError(latents, run.finalLatents), 1e-5, name)
            Checksums(of: latents).assertClose(to: run.finalChecksums, count: final.count, "\(name) final")
        }
    }

    func testUnknownNamesListTheValidOnes() {
        XCTAssertThrowsError(try SchedulerKind(named: "euler")) { error in
            XCTAssertEqual(error.localizedDescription, "unknown scheduler \"euler\"; SUNEdgeKit runs: ddim, dpmpp_2m")
        }
        XCTAssertThrowsError(try Spacing(named: "karras"))
        XCTAssertThrowsError(try Sampler.plan(.ddim, steps: 0, spacing: .trailing))
    }

    func testCancellationStopsBeforeTheNextStep() async throws {
        let noise = TorchNoise.randn(seed: 0, shape: [1, 4, 8, 8])
        let task = Task {
            try await Sampler.sample(.dpmpp2m, noise: noise, steps: 25, spacing: .linspace, eps: { x, t in
                try await Task.sleep(nanoseconds: 50_000_000)  // a slow model: the run outlives cancel()
                return SamplerTests.analyticEps(x, t)
            })
        }
        task.cancel()
        do {
            _ = try await task.value
            XCTFail("a cancelled run must throw")
        } catch is CancellationError {
        }
    }
}
