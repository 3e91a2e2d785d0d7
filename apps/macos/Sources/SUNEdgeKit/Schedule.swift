import Foundation

/// How the sampling timesteps are spread over the training grid (Lin et al. 2023, table 2).
public enum Spacing: String, CaseIterable, Sendable {
    case trailing
    case leading
    case linspace

    /// The spacing a manifest names, or an error listing the valid ones.
    public init(named name: String) throws {
        guard let spacing = Spacing(rawValue: name) else {
            throw SUNEdgeError.invalidArgument("unknown spacing \"\(name)\"; choose one of: "
                + Spacing.allCases.map(\.rawValue).joined(separator: ", "))
        }
        self = spacing
    }
}

/// A discrete variance-preserving schedule with scaled-linear betas, SD1.5's defaults; the same numbers as
/// `sun_edge.sampling.NoiseSchedule` (and so as diffusers' schedulers) to float32 rounding.
public struct NoiseSchedule: Sendable, Equatable {
    public var numTrainTimesteps = 1000
    public var betaStart = 0.00085
    public var betaEnd = 0.012
    public var stepsOffset = 1

    public static let sd15 = NoiseSchedule()

    public init() {}

    /// alpha_bar_t = prod(1 - beta_s, s <= t), beta = linspace(sqrt(b0), sqrt(b1))^2, built as diffusers builds it:
    /// the linspace in float32 (start + step * i below halfway, end - step * (n - 1 - i) above), squared and
    /// subtracted from 1 in float32, the cumulative product in float64 rounded to float32. Returned as float64.
    public func alphasCumprod() -> [Double] {
        let n = numTrainTimesteps
        let start = Float(betaStart.squareRoot())
        let end = Float(betaEnd.squareRoot())
        let step = (end - start) / Float(n - 1)
        var product = 1.0
        var out = [Double](repeating: 0, count: n)
        for i in 0..<n {
            let fromStart = Double(start) + Double(step) * Double(i)
            let fromEnd = Double(end) - Double(step) * Double(n - 1 - i)
            let rootBeta = Float(i < n / 2 ? fromStart : fromEnd)
            let alpha = Float(1) - rootBeta * rootBeta
            product *= Double(alpha)
            out[i] = Double(Float(product))
        }
        return out
    }

    /// Noise-to-signal ratio sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float64.
    public func sigmas() -> [Double] {
        alphasCumprod().map { ((1.0 - $0) / $0).squareRoot() }
    }

    /// The descending timesteps of a run. `intervals` puts `steps + 1` points and drops the one nearest 0
    /// (DPMSolverMultistepScheduler); `points` puts `steps` (DDIMScheduler). Trailing is the same in both.
    /// Linspace points are rounded on the intervals grid only (callers round for DDIM), as in sun-edge.
    public func timesteps(steps: Int, spacing: Spacing, intervals: Bool = false) throws -> [Double] {
        let tMax = numTrainTimesteps
        let points = intervals ? steps + 1 : steps
        let maxSteps = intervals ? tMax - 1 : tMax
        guard steps >= 1, steps <= maxSteps else {
            throw SUNEdgeError.invalidArgument("steps must be between 1 and \(maxSteps), got \(steps)")
        }
        var ts: [Double]
        switch spacing {
        case .linspace:
            ts = linspace(0, Double(tMax - 1), count: points).reversed()
            if intervals {
                ts = ts.map { $0.rounded(.toNearestOrEven) }
            }
        case .leading:
            let stride = Double(tMax / points)
            ts = (0..<points).map { Double($0) * stride }.reversed().map { $0 + Double(stepsOffset) }
        case .trailing:
            ts = arange(Double(tMax), step: -Double(tMax) / Double(steps), count: steps)
                .map { $0.rounded(.toNearestOrEven) - 1.0 }
        }
        ts = Array(ts.prefix(steps))
        let descending = zip(ts, ts.dropFirst()).allSatisfy { $0.0 > $0.1 }
        guard descending, let last = ts.last, last >= 0, ts[0] <= Double(tMax - 1) else {
            throw SUNEdgeError.invalidArgument("\(steps) steps with \(spacing.rawValue) spacing leave the 0..\(tMax - 1) "
                + "grid; use fewer steps")
        }
        return ts
    }
}

/// NumPy's `linspace(start, stop, count)`: `start + i * step`, the last point set to `stop` exactly.
func linspace(_ start: Double, _ stop: Double, count: Int) -> [Double] {
    guard count > 1 else { return count == 1 ? [start] : [] }
    let step = (stop - start) / Double(count - 1)
    var out = (0..<count).map { Double($0) * step + start }
    out[count - 1] = stop
    return out
}

/// The first `count` values of NumPy's float `arange(start, _, step)`: `start`, `start + step`, then
/// `start + i * delta` with `delta = (start + step) - start`, as NumPy fills them.
func arange(_ start: Double, step: Double, count: Int) -> [Double] {
    guard count > 1 else { return count == 1 ? [start] : [] }
    let second = start + step
    let delta = second - start
    return (0..<count).map { $0 == 0 ? start : $0 == 1 ? second : start + Double($0) * delta }
}
