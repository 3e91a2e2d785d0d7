import Foundation

/// The 32-bit Mersenne Twister (Matsumoto & Nishimura 1998), seeded with init_genrand as PyTorch's CPU generator is.
public struct MT19937: Sendable {
    private static let n = 624
    private static let m = 397
    private var state: [UInt32]
    private var index: Int

    /// Seeded as `torch.Generator().manual_seed(seed)`: only the low 32 bits count.
    public init(seed: UInt64) {
        var state = [UInt32](repeating: 0, count: Self.n)
        state[0] = UInt32(truncatingIfNeeded: seed)
        for i in 1..<Self.n {
            let previous = state[i - 1]
            state[i] = 1_812_433_253 &* (previous ^ (previous >> 30)) &+ UInt32(i)
        }
        self.state = state
        self.index = Self.n
    }

    /// The next 32-bit draw (genrand_int32).
    public mutating func next() -> UInt32 {
        if index >= Self.n {
            twist()
        }
        var y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    private mutating func twist() {
        for i in 0..<Self.n {
            let y = (state[i] & 0x8000_0000) | (state[(i + 1) % Self.n] & 0x7FFF_FFFF)
            var value = state[(i + Self.m) % Self.n] ^ (y >> 1)
            if y & 1 != 0 {
                value ^= 0x9908_B0DF
            }
            state[i] = value
        }
        index = 0
    }
}

/// Initial latent noise that equals `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` on the CPU,
/// as sun_edge/noise.py computes it (`--noise torch`, sun-edge's default), so a seed gives the image `sun-edge generate`
/// gives.
///
/// - numel >= 16: numel float32 uniforms `(u32 & (2^24 - 1)) * 2^-24`, Box-Muller on each block of 16
///   (for j < 8: u1 = 1 - u[j], u2 = u[j + 8], r = sqrt(-2 log u1), theta = 2 pi u2, out[j] = r cos theta,
///   out[j + 8] = r sin theta); when numel % 16 != 0, 16 fresh uniforms replace the last 16 values.
/// - numel < 16: per pair of outputs two float64 uniforms `((hi << 32 | lo) & (2^53 - 1)) * 2^-53`, u1 then u2,
///   r = sqrt(-2 log(1 - u2)), theta = 2 pi u1, out = r cos theta, r sin theta in float64.
///
/// Values agree with torch to a few float32 ulps (x86 builds of PyTorch use SLEEF float32 math), not bit for bit.
public enum TorchNoise {
    private static let twoPiF32 = Float(2.0 * Double.pi)

    /// Unit-variance Gaussian noise, `shape.reduce(1, *)` float32 values in row-major order.
    public static func randn(seed: UInt64, shape: [Int]) -> [Float] {
        let count = shape.reduce(1, *)
        var generator = MT19937(seed: seed)
        if count < 16 {
            return scalarPath(count: count, generator: &generator)
        }
        var uniforms = [Float](repeating: 0, count: count)
        for i in 0..<count {
            uniforms[i] = uniform24(generator.next())
        }
        var out = [Float](repeating: 0, count: count)
        let blocks = count / 16
        for block in 0..<blocks {
            boxMuller16(uniforms, from: block * 16, into: &out, at: block * 16)
        }
        if count % 16 != 0 {
            var tail = [Float](repeating: 0, count: 16)
            for i in 0..<16 {
                tail[i] = uniform24(generator.next())
            }
            boxMuller16(tail, from: 0, into: &out, at: count - 16)
        }
        return out
    }

    /// A float32 uniform in [0, 1) from the low 24 bits of one draw (uniform_real_distribution<float>).
    static func uniform24(_ draw: UInt32) -> Float {
        Float(draw & 0xFF_FFFF) * Float(1.0 / 16_777_216.0)
    }

    /// A float64 uniform in [0, 1) from the low 53 bits of (first << 32 | second).
    static func uniform53(_ generator: inout MT19937) -> Double {
        let high = UInt64(generator.next())
        let low = UInt64(generator.next())
        let bits = ((high << 32) | low) & ((UInt64(1) << 53) - 1)
        return Double(bits) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// ATen's normal_fill_16: 16 uniforms at `source[offset...]` to 16 normals at `out[at...]`, float32 arithmetic
    /// with log, cos and sin evaluated in float64 and rounded (correctly rounded float32 results).
    private static func boxMuller16(_ source: [Float], from offset: Int, into out: inout [Float], at start: Int) {
        for j in 0..<8 {
            let u1 = Float(1) - source[offset + j]  // (0, 1]
            let u2 = source[offset + j + 8]
            let logU1 = Float(Foundation.log(Double(u1)))
            let radius = (Float(-2) * logU1).squareRoot()
            let theta = Double(twoPiF32 * u2)  // float32 product, as on x86 builds
            out[start + j] = radius * Float(Foundation.cos(theta))
            out[start + j + 8] = radius * Float(Foundation.sin(theta))
        }
    }

    /// PyTorch's scalar path for fewer than 16 values, in float64 then rounded once.
    private static func scalarPath(count: Int, generator: inout MT19937) -> [Float] {
        var out: [Float] = []
        out.reserveCapacity(count + 1)
        while out.count < count {
            let u1 = uniform53(&generator)
            let u2 = uniform53(&generator)
            let radius = (-2.0 * Foundation.log1p(-u2)).squareRoot()
            let theta = 2.0 * Double.pi * u1
            out.append(Float(radius * Foundation.cos(theta)))
            out.append(Float(radius * Foundation.sin(theta)))
        }
        return Array(out.prefix(count))
    }
}
