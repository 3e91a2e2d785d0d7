@testable import SUNEdgeKit
import XCTest

/// noise.json: `torch.randn` on the CPU as sun_edge.noise computes it, for several seeds and shapes (the block
/// path, its 16-value tail when numel % 16 != 0, the float64 scalar path below 16 values, 64-bit seeds).
final class NoiseTests: XCTestCase {
    struct NoiseVectors: Decodable {
        struct Case: Decodable {
            let seedDecimal: String  // 2^64 - 1 does not survive every JSON number parser
            let shape: [Int]
            let checksums: Checksums
            let values: [Float]?
            let head: [Float]?
            let tail: [Float]?

            enum CodingKeys: String, CodingKey {
                case shape, checksums, values, head, tail
                case seedDecimal = "seed_decimal"
            }

            var seed: UInt64 { UInt64(seedDecimal)! }
        }

        let cases: [Case]
    }

    func testMersenneTwisterReferenceOutput() {
        var generator = MT19937(seed: 5489)  // the reference implementation's default seed
        XCTAssertEqual(generator.next(), 3_499_211_612)
        XCTAssertEqual(generator.next(), 581_869_302)
    }

    func testNoiseEqualsSunEdge() throws {
        let vectors = try Vectors.load(NoiseVectors.self, from: "noise.json")
        XCTAssertFalse(vectors.cases.isEmpty)
        for item in vectors.cases {
            let name = "seed \(item.seed) shape \(item.shape)"
            let values = TorchNoise.randn(seed: item.seed, shape: item.shape)
            XCTAssertEqual(values.count, item.shape.reduce(1, *), name)
            if let expected = item.values {
                XCTAssertLessThanOrEqual(maxAbsDifference(values, expected), 5e-6, name)
            }
            if let head = item.head, let tail = item.tail {
                XCTAssertLessThanOrEqual(maxAbsDifference(Array(values.prefix(head.count)), head), 5e-6, "\(name) head")
                XCTAssertLessThanOrEqual(maxAbsDifference(Array(values.suffix(tail.count)), tail), 5e-6, "\(name) tail")
            }
            Checksums(of: values).assertClose(to: item.checksums, count: values.count, name)
        }
    }

    func testOnlyTheLow32BitsOfTheSeedCount() {
        XCTAssertEqual(TorchNoise.randn(seed: (1 << 32) + 3, shape: [1, 4, 8, 8]), TorchNoise.randn(seed: 3, shape: [1, 4, 8, 8]))
    }

    private func maxAbsDifference(_ a: [Float], _ b: [Float]) -> Float {
        XCTAssertEqual(a.count, b.count)
        return zip(a, b).map { abs($0 - $1) }.max() ?? 0
    }
}
