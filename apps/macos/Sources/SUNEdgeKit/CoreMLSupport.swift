import CoreML
import CryptoKit
import Foundation

/// The hardware Core ML may use, named as sun-edge's `--compute-units` names them.
public enum ComputeUnits: String, CaseIterable, Sendable {
    case all
    case cpuAndGPU = "cpu-and-gpu"
    case cpuAndNeuralEngine = "cpu-and-ne"
    case cpuOnly = "cpu-only"

    var coreML: MLComputeUnits {
        switch self {
        case .all: return .all
        case .cpuAndGPU: return .cpuAndGPU
        case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
        case .cpuOnly: return .cpuOnly
        }
    }
}

/// Compiling `.mlpackage` resources once and keeping the `.mlmodelc` results, keyed by the sha256 of the
/// package's files as the manifest records them (a re-exported bundle gets a new key, an unchanged one is reused).
struct CompiledModelCache: Sendable {
    let directory: URL

    /// `~/Library/Caches/SUNEdgeKit` (the app's caches directory in a sandbox or on iOS).
    static func defaultDirectory() -> URL {
        let caches = FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask).first
            ?? FileManager.default.temporaryDirectory
        return caches.appendingPathComponent("SUNEdgeKit", isDirectory: true)
    }

    /// One key per component version: sha256 over its files' relative paths and sha256 values, sorted.
    static func key(for entry: ComponentEntry) -> String {
        let lines = entry.sha256.keys.sorted().map { "\($0)\t\(entry.sha256[$0]!)\n" }.joined()
        return SHA256.hash(data: Data(lines.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// Where the compiled model of `entry` lives once compiled.
    func location(of entry: ComponentEntry) -> URL {
        let stem = URL(fileURLWithPath: entry.file).deletingPathExtension().lastPathComponent
        return directory.appendingPathComponent(Self.key(for: entry), isDirectory: true)
            .appendingPathComponent("\(stem).mlmodelc", isDirectory: true)
    }

    /// The compiled model of `entry`, compiling `package` with `MLModel.compileModel(at:)` on first use.
    /// The result is moved into place under a temporary name first, so an interrupted compile is never reused.
    func compiledModel(of entry: ComponentEntry, package: URL, component: String) async throws -> URL {
        let destination = location(of: entry)
        let files = FileManager.default
        if files.fileExists(atPath: destination.path) {
            return destination
        }
        let compiled: URL
        do {
            compiled = try await MLModel.compileModel(at: package)
        } catch {
            throw SUNEdgeError.coreML(component: component, stage: "compile \(package.lastPathComponent) for", underlying:
                error.localizedDescription)
        }
        do {
            let parent = destination.deletingLastPathComponent()
            try files.createDirectory(at: parent, withIntermediateDirectories: true)
            let staging = parent.appendingPathComponent(".\(destination.lastPathComponent).partial-\(UUID().uuidString)")
            try files.moveItem(at: compiled, to: staging)
            if files.fileExists(atPath: destination.path) {  // another process finished first
                try? files.removeItem(at: staging)
            } else {
                try files.moveItem(at: staging, to: destination)
            }
        } catch {
            throw SUNEdgeError.coreML(component: component, stage: "cache the compiled model of", underlying:
                "\(error.localizedDescription) (cache directory \(directory.path))")
        }
        return destination
    }
}

/// The sha256 of a file, read in 4 MiB chunks.
func sha256(of url: URL) throws -> String {
    let handle = try FileHandle(forReadingFrom: url)
    defer { try? handle.close() }
    var hasher = SHA256()
    while let chunk = try handle.read(upToCount: 4 << 20), !chunk.isEmpty {
        hasher.update(data: chunk)
    }
    return hasher.finalize().map { String(format: "%02x", $0) }.joined()
}

/// Check that a loaded model declares exactly the inputs and outputs the manifest lists (names, dtypes, shapes).
func checkInterface(of model: MLModel, component: String, entry: ComponentEntry) throws {
    let description = model.modelDescription
    for (kind, specs, declared) in [("input", entry.inputs, description.inputDescriptionsByName),
                                    ("output", entry.outputs, description.outputDescriptionsByName)] {
        let names = Set(specs.map(\.name))
        if Set(declared.keys) != names {
            throw SUNEdgeError.modelInterfaceMismatch(component: component, detail: "\(entry.file) declares \(kind)s "
                + "\(declared.keys.sorted().joined(separator: ", ")), but manifest.json lists "
                + "\(specs.map(\.name).joined(separator: ", "))")
        }
        for spec in specs {
            guard let constraint = declared[spec.name]?.multiArrayConstraint else {
                throw SUNEdgeError.modelInterfaceMismatch(component: component, detail: "\(kind) \(spec.name) of "
                    + "\(entry.file) is not a multi-array")
            }
            let shape = constraint.shape.map(\.intValue)
            let dtype = dtypeName(constraint.dataType)
            if shape != spec.shape || dtype != spec.dtype {
                throw SUNEdgeError.modelInterfaceMismatch(component: component, detail: "\(entry.file) declares \(kind) "
                    + "\(spec.name) \(dtype) \(shape), but manifest.json says \(spec.dtype) \(spec.shape)")
            }
        }
    }
}

func dtypeName(_ type: MLMultiArrayDataType) -> String {
    switch type {
    case .float32: return "float32"
    case .float16: return "float16"
    case .double: return "float64"
    case .int32: return "int32"
    default: return "type \(type.rawValue)"
    }
}

extension MLMultiArray {
    /// A new float32 array of `shape` holding `values` in row-major order.
    static func float32(_ values: [Float], shape: [Int]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
        array.withUnsafeMutableBufferPointer(ofType: Float.self) { buffer, strides in
            forEachOffset(shape: shape, strides: strides) { index, offset in buffer[offset] = values[index] }
        }
        return array
    }

    /// A new int32 array of `shape` holding `values` in row-major order.
    static func int32(_ values: [Int], shape: [Int]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            forEachOffset(shape: shape, strides: strides) { index, offset in buffer[offset] = Int32(values[index]) }
        }
        return array
    }

    /// The values in row-major order as float32, whatever the array's strides (Core ML may pad outputs).
    func floatValues() -> [Float] {
        let dims = shape.map(\.intValue)
        var out = [Float](repeating: 0, count: dims.reduce(1, *))
        switch dataType {
        case .float32:
            withUnsafeBufferPointer(ofType: Float.self) { buffer, strides in
                forEachOffset(shape: dims, strides: strides) { index, offset in out[index] = buffer[offset] }
            }
        case .double:
            withUnsafeBufferPointer(ofType: Double.self) { buffer, strides in
                forEachOffset(shape: dims, strides: strides) { index, offset in out[index] = Float(buffer[offset]) }
            }
        default:  // float16 and others: through NSNumber (slow; sun-edge bundles declare float32 outputs)
            forEachOffset(shape: dims, strides: strides.map(\.intValue)) { index, _ in
                var rest = index
                var key = [NSNumber](repeating: 0, count: dims.count)
                for axis in stride(from: dims.count - 1, through: 0, by: -1) {
                    key[axis] = NSNumber(value: rest % dims[axis])
                    rest /= dims[axis]
                }
                out[index] = self[key].floatValue
            }
        }
        return out
    }
}

/// Visit every element of a row-major `shape`: its linear index and its storage offset under `strides`.
func forEachOffset(shape: [Int], strides: [Int], _ body: (Int, Int) -> Void) {
    let count = shape.reduce(1, *)
    guard count > 0 else { return }
    var contiguous = true
    var expected = 1
    for axis in stride(from: shape.count - 1, through: 0, by: -1) {
        if shape[axis] > 1, strides[axis] != expected { contiguous = false }
        expected *= shape[axis]
    }
    if contiguous {
        for index in 0..<count { body(index, index) }
        return
    }
    var position = [Int](repeating: 0, count: shape.count)
    for index in 0..<count {
        body(index, zip(position, strides).reduce(0) { $0 + $1.0 * $1.1 })
        var axis = shape.count - 1
        while axis >= 0 {
            position[axis] += 1
            if position[axis] < shape[axis] { break }
            position[axis] = 0
            axis -= 1
        }
    }
}
