import CoreGraphics
import Foundation
import ImageIO
import UniformTypeIdentifiers

/// Decoded images to pixels, as sun-edge's `imaging.to_pil` does it.
public enum ImageConversion {
    /// 8-bit RGB of one decoded image [3,H,W] in [-1, 1], row-major: `clip((x + 1) * 127.5 + 0.5, 0, 255)` truncated,
    /// in float32 as NumPy computes it. Non-finite values become 0.
    public static func rgbBytes(fromCHW values: [Float], height: Int, width: Int) throws -> [UInt8] {
        guard values.count == 3 * height * width else {
            throw SUNEdgeError.shapeMismatch(what: "decoded image", expected: [3, height, width], found: [values.count])
        }
        var pixels = [UInt8](repeating: 0, count: 3 * height * width)
        let plane = height * width
        for channel in 0..<3 {
            for i in 0..<plane {
                let scaled = (values[channel * plane + i] + 1) * 127.5 + 0.5
                let clipped = scaled.isFinite ? min(max(scaled, 0), 255) : 0
                pixels[i * 3 + channel] = UInt8(clipped)
            }
        }
        return pixels
    }

    /// A CGImage (sRGB, 8 bits per channel, no alpha) of one decoded image [3,H,W] in [-1, 1].
    public static func cgImage(fromCHW values: [Float], height: Int, width: Int) throws -> CGImage {
        try cgImage(rgb: rgbBytes(fromCHW: values, height: height, width: width), height: height, width: width)
    }

    /// A CGImage of packed 8-bit RGB pixels.
    public static func cgImage(rgb pixels: [UInt8], height: Int, width: Int) throws -> CGImage {
        guard let provider = CGDataProvider(data: Data(pixels) as CFData),
              let space = CGColorSpace(name: CGColorSpace.sRGB),
              let image = CGImage(width: width, height: height, bitsPerComponent: 8, bitsPerPixel: 24,
                                  bytesPerRow: 3 * width, space: space,
                                  bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.none.rawValue),
                                  provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
        else {
            throw SUNEdgeError.invalidArgument("cannot make a \(width)x\(height) RGB image")
        }
        return image
    }

    /// The packed 8-bit RGB pixels of any CGImage (drawn into an RGBA context, alpha dropped).
    public static func rgbBytes(of image: CGImage) throws -> [UInt8] {
        let width = image.width, height = image.height
        var rgba = [UInt8](repeating: 0, count: 4 * width * height)
        guard let space = CGColorSpace(name: CGColorSpace.sRGB) else {
            throw SUNEdgeError.invalidArgument("no sRGB color space")
        }
        let drawn: Bool = rgba.withUnsafeMutableBytes { buffer in
            guard let context = CGContext(data: buffer.baseAddress, width: width, height: height, bitsPerComponent: 8,
                                          bytesPerRow: 4 * width, space: space,
                                          bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue) else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        guard drawn else {
            throw SUNEdgeError.invalidArgument("cannot read the pixels of a \(width)x\(height) image")
        }
        var rgb = [UInt8](repeating: 0, count: 3 * width * height)
        for i in 0..<(width * height) {
            rgb[3 * i] = rgba[4 * i]
            rgb[3 * i + 1] = rgba[4 * i + 1]
            rgb[3 * i + 2] = rgba[4 * i + 2]
        }
        return rgb
    }

    /// Write `image` as a PNG file.
    public static func writePNG(_ image: CGImage, to url: URL) throws {
        guard let destination = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil)
        else {
            throw SUNEdgeError.missingFile(path: url.deletingLastPathComponent().path,
                                           hint: "create the output folder first")
        }
        CGImageDestinationAddImage(destination, image, nil)
        guard CGImageDestinationFinalize(destination) else {
            throw SUNEdgeError.invalidArgument("cannot write the PNG \(url.path)")
        }
    }

    /// Read a PNG (or any format ImageIO reads) as a CGImage.
    public static func readImage(at url: URL) throws -> CGImage {
        guard let source = CGImageSourceCreateWithURL(url as CFURL, nil),
              let image = CGImageSourceCreateImageAtIndex(source, 0, nil) else {
            throw SUNEdgeError.missingFile(path: url.path, hint: "it is not a readable image")
        }
        return image
    }

    /// Parity as sun-edge measures it: PSNR in dB with the peak taken from the reference,
    /// `20 log10(max|ref| / rms(ref - out))`.
    public static func psnr(reference: [Float], candidate: [Float]) -> Double {
        precondition(reference.count == candidate.count && !reference.isEmpty, "arrays must have one size")
        var peak = 0.0, squared = 0.0
        for (r, c) in zip(reference, candidate) {
            peak = max(peak, abs(Double(r)))
            squared += (Double(r) - Double(c)) * (Double(r) - Double(c))
        }
        let rms = (squared / Double(reference.count)).squareRoot()
        return rms == 0 ? .infinity : 20 * log10(peak / rms)
    }
}
