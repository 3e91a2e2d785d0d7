import Foundation

/// The samplers a bundle's manifest may name: `ddim` (SUN's default, 4 trailing steps) and `dpmpp_2m`
/// (the CFG baseline's, 25 linspace steps). sun-edge's `euler` is not ported.
public enum SchedulerKind: String, CaseIterable, Sendable {
    case ddim
    case dpmpp2m = "dpmpp_2m"

    /// The scheduler a manifest names, or an error listing the valid ones.
    public init(named name: String) throws {
        guard let kind = SchedulerKind(rawValue: name) else {
            throw SUNEdgeError.invalidArgument("unknown scheduler \"\(name)\"; SUNEdgeKit runs: "
                + SchedulerKind.allCases.map(\.rawValue).joined(separator: ", "))
        }
        self = kind
    }
}

/// The model as a sampler sees it: latents [1,4,h,w] (exactly what the UNet takes) and the timestep, to eps.
public typealias EpsFunction = (_ latents: [Float], _ timestep: Float) async throws -> [Float]

/// The numbers one sampling run uses, for inspection and for the test vectors.
public struct SamplingPlan: Sendable, Equatable {
    /// The descending integer timesteps the model is called at.
    public let timesteps: [Int]
    /// alpha_bar at each timestep.
    public let alphas: [Double]
    /// DDIM: alpha_bar of the step's target (t - T / steps, or alpha_bar[0] below 0). Empty for DPM-Solver++.
    public let alphasPrev: [Double]
    /// DPM-Solver++: sigma at each timestep and a final 0 (steps + 1 values). Empty for DDIM.
    public let sigmas: [Double]
}

/// The NumPy samplers of sun_edge/sampling.py, step for step: update arithmetic in float64 on float64 latents,
/// the model called on float32; results equal sun-edge's (and diffusers') to float32 rounding.
public enum Sampler {
    /// The timesteps and coefficients of a run.
    public static func plan(_ kind: SchedulerKind, steps: Int, spacing: Spacing,
                            schedule: NoiseSchedule = .sd15) throws -> SamplingPlan {
        let table = schedule.alphasCumprod()
        switch kind {
        case .ddim:
            let ts = try schedule.timesteps(steps: steps, spacing: spacing).map { Int($0.rounded(.toNearestOrEven)) }
            let jump = schedule.numTrainTimesteps / steps
            return SamplingPlan(timesteps: ts, alphas: ts.map { table[$0] },
                                alphasPrev: ts.map { $0 - jump >= 0 ? table[$0 - jump] : table[0] }, sigmas: [])
        case .dpmpp2m:
            let ts = try schedule.timesteps(steps: steps, spacing: spacing, intervals: true)
                .map { Int($0.rounded(.toNearestOrEven)) }
            let sigmaTable = schedule.sigmas()
            return SamplingPlan(timesteps: ts, alphas: ts.map { table[$0] }, alphasPrev: [],
                                sigmas: ts.map { sigmaTable[$0] } + [0.0])
        }
    }

    /// A whole loop from unit-variance noise to x0 latents (float32, the shape of `noise`).
    /// `progress(done, total)` is called after every step; cancellation is checked before each model call.
    public static func sample(_ kind: SchedulerKind, noise: [Float], steps: Int, spacing: Spacing,
                              schedule: NoiseSchedule = .sd15, eps: EpsFunction,
                              progress: ((Int, Int) -> Void)? = nil) async throws -> [Float] {
        let grid = try Self.plan(kind, steps: steps, spacing: spacing, schedule: schedule)
        var x = noise.map(Double.init)  // init_noise_sigma = 1
        switch kind {
        case .ddim:
            for (i, t) in grid.timesteps.enumerated() {
                let e = try await predict(eps, x, t, step: i)
                let a = grid.alphas[i], aPrev = grid.alphasPrev[i]
                let noiseScale = (1.0 - a).squareRoot(), signal = a.squareRoot()
                let prevSignal = aPrev.squareRoot(), prevNoise = (1.0 - aPrev).squareRoot()
                for k in x.indices {
                    let x0 = (x[k] - noiseScale * e[k]) / signal
                    x[k] = prevSignal * x0 + prevNoise * e[k]
                }
                progress?(i + 1, grid.timesteps.count)
            }
        case .dpmpp2m:
            let sigmas = grid.sigmas
            var oldDenoised: [Double]?
            var hLast = 0.0
            for (i, t) in grid.timesteps.enumerated() {
                let e = try await predict(eps, x, t, step: i)
                let alphaS = 1.0 / (1.0 + sigmas[i] * sigmas[i]).squareRoot()
                let sS = sigmas[i] * alphaS
                var denoised = x
                for k in x.indices {
                    denoised[k] = (x[k] - sS * e[k]) / alphaS
                }
                if sigmas[i + 1] == 0.0 {  // lambda_t = inf: the first-order update returns x0
                    x = denoised
                } else {
                    let alphaT = 1.0 / (1.0 + sigmas[i + 1] * sigmas[i + 1]).squareRoot()
                    let sT = sigmas[i + 1] * alphaT
                    let h = Foundation.log(sigmas[i]) - Foundation.log(sigmas[i + 1])  // lambda_t - lambda_s
                    var d = denoised
                    if let old = oldDenoised, i != grid.timesteps.count - 1 {
                        let r = hLast / h
                        let a = 1.0 + 1.0 / (2.0 * r), b = 1.0 / (2.0 * r)
                        for k in d.indices {
                            d[k] = a * denoised[k] - b * old[k]
                        }
                    }
                    let ratio = sT / sS, c = alphaT * Foundation.expm1(-h)
                    for k in x.indices {
                        x[k] = ratio * x[k] - c * d[k]
                    }
                    hLast = h
                }
                oldDenoised = denoised
                progress?(i + 1, grid.timesteps.count)
            }
        }
        return x.map(Float.init)
    }

    /// Call the model on float32 latents, check its output, return eps as float64.
    private static func predict(_ eps: EpsFunction, _ x: [Double], _ t: Int, step: Int) async throws -> [Double] {
        try Task.checkCancellation()
        let input = x.map(Float.init)
        guard input.allSatisfy(\.isFinite) else {
            throw SUNEdgeError.nonFinite(step: step, what: "the latents")
        }
        let out = try await eps(input, Float(t))
        guard out.count == input.count else {
            throw SUNEdgeError.shapeMismatch(what: "eps", expected: [input.count], found: [out.count])
        }
        return out.map(Double.init)
    }
}
