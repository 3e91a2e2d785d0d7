import Foundation
import XCTest

/// The test vectors `scripts/make_swift_vectors.py` writes into `Resources/`, and the repository they came from.
enum Vectors {
    /// The URL of a vector file shipped in the test bundle's `Resources` folder.
    static func url(_ name: String) throws -> URL {
        let stem = (name as NSString).deletingPathExtension, ext = (name as NSString).pathExtension
        guard let url = Bundle.module.url(forResource: stem, withExtension: ext, subdirectory: "Resources") else {
            throw XCTSkip("test vector \(name) is missing: run scripts/make_swift_vectors.py")
        }
        return url
    }

    /// Decode a vector file.
    static func load<T: Decodable>(_ type: T.Type, from name: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(contentsOf: url(name)))
    }

    /// The sun-edge checkout this package sits in (this file is apps/macos/Tests/SUNEdgeKitTests/TestSupport.swift).
    static let repository: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()

    /// A file of the checkout, e.g. `sun_edge/data/vocab.json`.
    static func repositoryFile(_ path: String) throws -> URL {
        let url = repository.appendingPathComponent(path)
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw XCTSkip("\(path) is not at \(url.path): run the tests inside a sun-edge checkout")
        }
        return url
    }
}

/// Float64 sums of float32 values, as the vectors' `checksums`.
struct Checksums: Decodable {
    let sum: Double
    let sumAbs: Double
    let sumSquares: Double

    enum CodingKeys: String, CodingKey {
        case sum
        case sumAbs = "sum_abs"
        case sumSquares = "sum_squares"
    }

    init(sum: Double, sumAbs: Double, sumSquares: Double) {
        self.sum = sum
        self.sumAbs = sumAbs
        self.sumSquares = sumSquares
    }

    init(of values: [Float]) {
        var sum = 0.0, sumAbs = 0.0, sumSquares = 0.0
        for value in values.map(Double.init) {
            sum += value
            sumAbs += abs(value)
            sumSquares += value * value
        }
        self.init(sum: sum, sumAbs: sumAbs, sumSquares: sumSquares)
    }

    /// Within float32 rounding of `count` values of this size.
    func assertClose(to expected: Checksums, count: Int, _ message: String, file: StaticString = #filePath,
                     line: UInt = #line) {
        let tolerance = 1e-6 * expected.sumAbs + 1e-9 * Double(count)
        XCTAssertEqual(sum, expected.sum, accuracy: tolerance, "\(message): sum", file: file, line: line)
        XCTAssertEqual(sumAbs, expected.sumAbs, accuracy: tolerance, "\(message): sum_abs", file: file, line: line)
        XCTAssertEqual(sumSquares, expected.sumSquares, accuracy: 1e-6 * expected.sumSquares + 1e-9,
                       "\(message): sum_squares", file: file, line: line)
    }
}

/// max |a - b| / max |b|: 0 for equal arrays.
func relativeError(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count)
    var worst = 0.0, peak = 0.0
    for (x, y) in zip(a, b) {
        worst = max(worst, abs(Double(x) - Double(y)))
        peak = max(peak, abs(Double(y)))
    }
    return peak == 0 ? worst : worst / peak
}
