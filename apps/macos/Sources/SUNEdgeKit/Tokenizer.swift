import Foundation

/// The CLIP byte-level BPE tokenizer of SD1.5's text encoder, equal to sun-edge's `sun_edge.tokenizer.CLIPTokenizer`:
/// CLIP's cleanup (``TextCleaner``), CLIP's pre-tokenizer split, byte-level BPE (lowest-rank merge first), then
/// BOS, at most 75 tokens, EOS, and EOS padding to 77 (SD1.5 pads with `<|endoftext|>`, not 0 as open_clip does).
///
///     let tokenizer = try CLIPTokenizer(vocabURL: bundle.appendingPathComponent("vocab.json"),
///                                       mergesURL: bundle.appendingPathComponent("merges.txt"))
///     tokenizer.encode("a photo of a cat")  // [49406, 320, 1125, 539, 320, 2368, 49407, 49407, ...]: 77 ids
public struct CLIPTokenizer: Sendable {
    public static let contextLength = 77
    public static let bosToken = "<|startoftext|>"
    public static let eosToken = "<|endoftext|>"
    private static let endOfWord = "</w>"

    public let bosID: Int
    public let eosID: Int
    public var padID: Int { eosID }
    public var vocabSize: Int { encoder.count }

    private let encoder: [String: Int]
    private let decoder: [Int: String]
    private let ranks: [Pair: Int]
    private let byteEncoder: [String]  // byte -> BPE alphabet character
    private let byteDecoder: [UInt32: UInt8]  // alphabet code point -> byte
    private let cleaner: TextCleaner

    private struct Pair: Hashable {
        let first: String
        let second: String
    }

    /// Load a Hugging Face `vocab.json` / `merges.txt` pair, checked as sun-edge checks it.
    public init(vocabURL: URL, mergesURL: URL) throws {
        let vocabData = try Self.read(vocabURL)
        let mergesData = try Self.read(mergesURL)
        let vocab: [String: Int]
        do {
            vocab = try JSONDecoder().decode([String: Int].self, from: vocabData)
        } catch {
            throw SUNEdgeError.tokenizer("\(vocabURL.path) is not a token->id JSON object (\(error)); use the vocab.json "
                + "of the bundle")
        }
        guard vocab.values.sorted() == Array(0..<vocab.count) else {
            throw SUNEdgeError.tokenizer("\(vocabURL.path): token ids are not 0..\(vocab.count - 1) without gaps; the file "
                + "is corrupt")
        }
        guard let mergesText = String(data: mergesData, encoding: .utf8) else {
            throw SUNEdgeError.tokenizer("\(mergesURL.path) is not UTF-8 text")
        }
        var lines = mergesText.components(separatedBy: "\n")
        if let first = lines.first, first.hasPrefix("#version") {
            lines.removeFirst()
        }
        var ranks: [Pair: Int] = [:]
        var rank = 0
        for line in lines where !line.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            let parts = line.split(whereSeparator: { $0.isWhitespace }).map(String.init)
            guard parts.count == 2, vocab[parts[0] + parts[1]] != nil else {
                throw SUNEdgeError.tokenizer("\(mergesURL.path): merge \(rank) \"\(line)\" is malformed or not in the vocab")
            }
            ranks[Pair(first: parts[0], second: parts[1])] = rank  // a repeated pair keeps its last rank, as in Python
            rank += 1
        }
        let byteEncoder = Self.bytesToUnicode()
        let required = [Self.bosToken, Self.eosToken] + byteEncoder + byteEncoder.map { $0 + Self.endOfWord }
        if let missing = required.first(where: { vocab[$0] == nil }) {
            throw SUNEdgeError.tokenizer("\(vocabURL.path) lacks CLIP tokens (e.g. \"\(missing)\"); not a CLIP vocab")
        }
        self.encoder = vocab
        self.decoder = Dictionary(uniqueKeysWithValues: vocab.map { ($0.value, $0.key) })
        self.ranks = ranks
        self.byteEncoder = byteEncoder
        var byteDecoder: [UInt32: UInt8] = [:]
        for (byte, character) in byteEncoder.enumerated() {
            byteDecoder[character.unicodeScalars.first!.value] = UInt8(byte)
        }
        self.byteDecoder = byteDecoder
        self.bosID = vocab[Self.bosToken]!
        self.eosID = vocab[Self.eosToken]!
        self.cleaner = try TextCleaner.shipped()
    }

    /// The tokenizer files a bundle ships (`manifest.tokenizer`).
    public init(bundle: URL, manifest: BundleManifest) throws {
        try self.init(vocabURL: bundle.appendingPathComponent(manifest.tokenizer.vocab),
                      mergesURL: bundle.appendingPathComponent(manifest.tokenizer.merges))
    }

    /// CLIP's text cleanup (ftfy, HTML unescaping, whitespace, lowercase), as sun-edge's `clean_text`.
    public func clean(_ text: String) -> String {
        String(String.UnicodeScalarView(cleaner.clean(text)))
    }

    /// The BPE ids of `text` after cleanup, without BOS/EOS and without truncation.
    public func tokenize(_ text: String) -> [Int] {
        cleaner.split(cleaner.clean(text)).flatMap { bpe(String(String.UnicodeScalarView($0))) }
    }

    /// Text encoder input ids: BOS, the prompt's tokens, EOS, then EOS padding, `maxLength` ids. A longer prompt
    /// keeps its first `maxLength - 2` tokens (``truncatedText(_:maxLength:)`` says what was cut).
    public func encode(_ text: String, maxLength: Int = contextLength) -> [Int] {
        precondition(maxLength >= 2, "maxLength must be at least 2 (BOS and EOS)")
        let tokens = Array(tokenize(text).prefix(maxLength - 2))
        let ids = [bosID] + tokens + [eosID]
        return ids + Array(repeating: padID, count: maxLength - ids.count)
    }

    /// The part of `text` that ``encode(_:maxLength:)`` cuts, or nil when the prompt fits.
    public func truncatedText(_ text: String, maxLength: Int = contextLength) -> String? {
        let tokens = tokenize(text)
        guard tokens.count > maxLength - 2 else { return nil }
        return decode(Array(tokens[(maxLength - 2)...]))
    }

    /// The text of `ids` (as cleaned: lowercase, single spaces), BOS/EOS/padding dropped.
    public func decode(_ ids: [Int]) -> String {
        var bytes: [UInt8] = []
        for id in ids {
            guard let token = decoder[id], token != Self.bosToken, token != Self.eosToken else { continue }
            let word = token.hasSuffix(Self.endOfWord) ? String(token.dropLast(Self.endOfWord.count)) : token
            bytes += word.unicodeScalars.compactMap { byteDecoder[$0.value] }
            if token.hasSuffix(Self.endOfWord) {
                bytes.append(0x20)
            }
        }
        return String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The ids of one pre-tokenized word: byte-level BPE, lowest-rank merge first.
    private func bpe(_ word: String) -> [Int] {
        if word == Self.bosToken || word == Self.eosToken {
            return [encoder[word]!]
        }
        var symbols = Array(word.utf8).map { byteEncoder[Int($0)] }
        guard !symbols.isEmpty else { return [] }
        symbols[symbols.count - 1] += Self.endOfWord
        while symbols.count > 1 {
            var best: (rank: Int, pair: Pair)?
            for i in 0..<(symbols.count - 1) {
                let pair = Pair(first: symbols[i], second: symbols[i + 1])
                if let rank = ranks[pair], rank < (best?.rank ?? Int.max) {
                    best = (rank, pair)
                }
            }
            guard let chosen = best else { break }
            let pair = chosen.pair
            var merged: [String] = []
            var i = 0
            while i < symbols.count {
                if i + 1 < symbols.count, symbols[i] == pair.first, symbols[i + 1] == pair.second {
                    merged.append(pair.first + pair.second)
                    i += 2
                } else {
                    merged.append(symbols[i])
                    i += 1
                }
            }
            symbols = merged
        }
        return symbols.map { encoder[$0]! }
    }

    /// CLIP's reversible map from the 256 byte values to printable characters (BPE's alphabet), indexed by byte.
    static func bytesToUnicode() -> [String] {
        let printable = Array(33...126) + Array(161...172) + Array(174...255)
        var table = [String](repeating: "", count: 256)
        for byte in printable {
            table[byte] = String(Character(Unicode.Scalar(UInt8(byte))))
        }
        var extra = 0
        for byte in 0..<256 where !printable.contains(byte) {
            table[byte] = String(Character(Unicode.Scalar(UInt32(256 + extra))!))
            extra += 1
        }
        return table
    }

    private static func read(_ url: URL) throws -> Data {
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw SUNEdgeError.missingFile(path: url.path, hint: "the bundle's tokenizer files are missing: re-export it")
        }
        do {
            return try Data(contentsOf: url)
        } catch {
            throw SUNEdgeError.tokenizer("cannot read tokenizer file \(url.path): \(error.localizedDescription)")
        }
    }
}
