import Foundation

/// CLIP's text cleanup as sun-edge runs it (`sun_edge.tokenizer.clean_text`): `ftfy.fix_text`, `html.unescape`
/// twice, whitespace collapsed, lowercase; then CLIP's pre-tokenizer split.
///
/// Python's behaviour comes from tables that `scripts/make_swift_vectors.py` writes from the very modules sun-edge
/// uses (ftfy, html, the `regex` module, Python's `str`), in `Resources/clip_text_tables.json`: HTML entities, ftfy's
/// ligature, width and control-character maps, Windows-1252, `str.lower`, `str.isspace`, and the `\p{L}`, `\p{N}`
/// and `\s` classes of the tokenizer's regex. So Unicode-version differences between Python and the OS do not
/// change token ids, except for NFC normalization, which uses the OS's tables.
///
/// ftfy's deterministic fixes are ported exactly (HTML entities, C1 controls, Latin ligatures, character width,
/// curly quotes, line breaks, terminal escapes, control characters, NFC, repeated until nothing changes). Its
/// mojibake repair is ported for the common case only: a line that is entirely Latin-1 or Windows-1252 and
/// re-decodes as valid UTF-8 is re-decoded (`schÃ¶n` -> `schön`). ftfy's other heuristics (partial mojibake
/// inside good text, other code pages, its badness score) are not ported; prompts that need them tokenize differently.
struct TextCleaner: Sendable {
    private let tables: TextTables

    init(tables: TextTables) {
        self.tables = tables
    }

    /// The tables shipped with SUNEdgeKit.
    static func shipped() throws -> TextCleaner {
        guard let url = Bundle.module.url(forResource: "clip_text_tables", withExtension: "json") else {
            throw SUNEdgeError.tokenizer("SUNEdgeKit's resource clip_text_tables.json is missing; the package is incomplete")
        }
        do {
            return TextCleaner(tables: try JSONDecoder().decode(TextTables.self, from: Data(contentsOf: url)))
        } catch {
            throw SUNEdgeError.tokenizer("SUNEdgeKit's clip_text_tables.json cannot be read: \(error)")
        }
    }

    // MARK: - clean_text

    /// `clean_text`: ftfy, `html.unescape` twice, whitespace collapsed to single spaces, lowercase.
    func clean(_ text: String) -> [Unicode.Scalar] {
        var scalars = fixText(Array(text.unicodeScalars))
        scalars = htmlUnescape(htmlUnescape(scalars))
        var words: [[Unicode.Scalar]] = []
        var current: [Unicode.Scalar] = []
        for scalar in scalars {
            if tables.pythonSpace.contains(scalar.value) {
                if !current.isEmpty {
                    words.append(current)
                    current = []
                }
            } else {
                current.append(scalar)
            }
        }
        if !current.isEmpty {
            words.append(current)
        }
        let space: [Unicode.Scalar] = [" "]
        return lowercased(Array(words.joined(separator: space)))
    }

    /// CLIP's pre-tokenizer, `regex.findall` of
    /// `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+` on cleaned text.
    func split(_ text: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        let specials: [[Unicode.Scalar]] = [Array("<|startoftext|>".unicodeScalars), Array("<|endoftext|>".unicodeScalars)]
        let contractions: [[Unicode.Scalar]] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"].map { Array($0.unicodeScalars) }
        var words: [[Unicode.Scalar]] = []
        var i = 0
        func matches(_ pattern: [Unicode.Scalar], at start: Int) -> Bool {
            start + pattern.count <= text.count && Array(text[start..<start + pattern.count]) == pattern
        }
        while i < text.count {
            if let literal = (specials + contractions).first(where: { matches($0, at: i) }) {
                words.append(literal)
                i += literal.count
                continue
            }
            let value = text[i].value
            if tables.letters.contains(value) {
                var j = i + 1
                while j < text.count, tables.letters.contains(text[j].value) { j += 1 }
                words.append(Array(text[i..<j]))
                i = j
            } else if tables.numbers.contains(value) {
                words.append([text[i]])
                i += 1
            } else if !tables.regexSpace.contains(value) {
                var j = i + 1
                while j < text.count, isOther(text[j].value) { j += 1 }
                words.append(Array(text[i..<j]))
                i = j
            } else {
                i += 1
            }
        }
        return words
    }

    private func isOther(_ value: UInt32) -> Bool {
        !tables.regexSpace.contains(value) && !tables.letters.contains(value) && !tables.numbers.contains(value)
    }

    // MARK: - ftfy.fix_text

    /// `ftfy.fix_text` with its default configuration, line by line; HTML unescaping stops for good at the
    /// first line holding a `<` (ftfy's `unescape_html="auto"`).
    func fixText(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        var unescape = true
        var start = 0
        while start < text.count {
            var end = start
            while end < text.count, text[end] != "\n" { end += 1 }
            end = min(end + 1, text.count)  // the line break stays with its line
            let segment = Array(text[start..<end])
            if unescape, segment.contains("<") {
                unescape = false
            }
            out += fixSegment(segment, unescapeHTML: unescape)
            start = end
        }
        return out
    }

    /// ftfy's `fix_and_explain`: every fix in ftfy's order, repeated until the text stops changing.
    private func fixSegment(_ segment: [Unicode.Scalar], unescapeHTML: Bool) -> [Unicode.Scalar] {
        var text = segment
        while true {
            let original = text
            if unescapeHTML {
                text = ftfyUnescapeHTML(text)
            }
            text = fixEncoding(text)
            text = text.flatMap { scalar -> [Unicode.Scalar] in  // fix_c1_controls
                (0x80...0x9F).contains(scalar.value) ? tables.windows1252Scalar(UInt8(scalar.value)) : [scalar]
            }
            text = translate(text, tables.ligatures)
            text = translate(text, tables.widthMap)
            text = text.map { scalar -> Unicode.Scalar in  // uncurl_quotes
                switch scalar.value {
                case 0x201C...0x201F: return "\""
                case 0x02BC, 0x2018...0x201B: return "'"
                default: return scalar
                }
            }
            text = fixLineBreaks(text)
            text = removeTerminalEscapes(text)
            text = text.filter { !tables.controlChars.contains($0.value) }
            text = Array(String(String.UnicodeScalarView(text)).precomposedStringWithCanonicalMapping.unicodeScalars)
            if text == original {
                return text
            }
        }
    }

    /// The common case of ftfy's `fix_encoding`: a non-ASCII text that is entirely Latin-1 (then Windows-1252,
    /// undefined bytes kept as Latin-1, ftfy's "sloppy" codec) and whose bytes are valid UTF-8 is decoded as UTF-8;
    /// repeated until nothing changes.
    private func fixEncoding(_ input: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var text = input
        while !text.allSatisfy(\.isASCII) {
            var fixed: [Unicode.Scalar]?
            let encoders: [([Unicode.Scalar]) -> [UInt8]?] = [{ latin1Bytes($0) }, { tables.windows1252Bytes($0) }]
            for encode in encoders {
                if let bytes = encode(text), let decoded = String(validatingUTF8Bytes: bytes) {
                    fixed = Array(decoded.unicodeScalars)
                    break
                }
            }
            guard let result = fixed, result != text else { break }
            text = result
        }
        return text
    }

    private func latin1Bytes(_ text: [Unicode.Scalar]) -> [UInt8]? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.count)
        for scalar in text {
            guard scalar.value <= 0xFF else { return nil }
            bytes.append(UInt8(scalar.value))
        }
        return bytes
    }

    private func translate(_ text: [Unicode.Scalar], _ table: [UInt32: [Unicode.Scalar]]) -> [Unicode.Scalar] {
        text.flatMap { table[$0.value] ?? [$0] }
    }

    private func fixLineBreaks(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        var i = 0
        while i < text.count {
            switch text[i].value {
            case 0x0D:
                out.append("\n")
                if i + 1 < text.count, text[i + 1] == "\n" { i += 1 }
            case 0x2028, 0x2029, 0x85:
                out.append("\n")
            default:
                out.append(text[i])
            }
            i += 1
        }
        return out
    }

    /// ftfy's ANSI_RE, `\033\[((?:\d|;)*)([a-zA-Z])`, removed.
    private func removeTerminalEscapes(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        var i = 0
        while i < text.count {
            if text[i] == "\u{1B}", i + 1 < text.count, text[i + 1] == "[" {
                var j = i + 2
                while j < text.count, (text[j] == ";" || text[j].properties.numericType == .decimal) { j += 1 }
                if j < text.count, text[j].isASCII, text[j].properties.isAlphabetic {
                    i = j + 1
                    continue
                }
            }
            out.append(text[i])
            i += 1
        }
        return out
    }

    // MARK: - HTML

    /// ftfy's `unescape_html`: `&#?[0-9A-Za-z]{1,24};` replaced when it is a known entity (HTML5 names ending in
    /// `;` and ftfy's upper-case variants) or a complete numeric reference.
    private func ftfyUnescapeHTML(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        var i = 0
        while i < text.count {
            guard text[i] == "&" else {
                out.append(text[i])
                i += 1
                continue
            }
            var j = i + 1
            if j < text.count, text[j] == "#" { j += 1 }
            let runStart = j
            while j < text.count, j - runStart < 25, isASCIIAlphanumeric(text[j]) { j += 1 }
            let run = j - runStart
            guard (1...24).contains(run), j < text.count, text[j] == ";" else {
                out.append(text[i])
                i += 1
                continue
            }
            let match = Array(text[i...j])
            let name = String(String.UnicodeScalarView(match))
            if let replacement = tables.ftfyEntities[name] {
                out += replacement.unicodeScalars
            } else if match.count > 1, match[1] == "#" {
                let unescaped = htmlUnescape(match)
                out += unescaped.contains(";") ? match : unescaped
            } else {
                out += match
            }
            i = j + 1
        }
        return out
    }

    /// Python's `html.unescape`: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)` replaced as the
    /// HTML5 standard says (numeric references with the invalid-reference table; named ones by longest prefix).
    func htmlUnescape(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard text.contains("&") else { return text }
        var out: [Unicode.Scalar] = []
        var i = 0
        while i < text.count {
            guard text[i] == "&", i + 1 < text.count else {
                out.append(text[i])
                i += 1
                continue
            }
            var j = i + 1
            if text[j] == "#" {
                var k = j + 1
                let hex = k < text.count && (text[k] == "x" || text[k] == "X")
                if hex { k += 1 }
                let digitsStart = k
                while k < text.count, (hex ? text[k].isASCIIHexDigit : text[k].isASCIIDigit) { k += 1 }
                guard k > digitsStart else {
                    out.append(text[i])
                    i += 1
                    continue
                }
                let digits = String(String.UnicodeScalarView(text[digitsStart..<k]))
                if k < text.count, text[k] == ";" { k += 1 }
                out += numericReference(digits, radix: hex ? 16 : 10)
                i = k
                continue
            }
            while j < text.count, j - (i + 1) < 32, !" \t\n\u{0C}<&#;".unicodeScalars.contains(text[j]) { j += 1 }
            guard j > i + 1 else {
                out.append(text[i])
                i += 1
                continue
            }
            if j < text.count, text[j] == ";" { j += 1 }
            let name = Array(text[(i + 1)..<j])
            out += namedReference(name)
            i = j
        }
        return out
    }

    private func numericReference(_ digits: String, radix: Int) -> [Unicode.Scalar] {
        let trimmed = digits.drop { $0 == "0" }
        let number = trimmed.count > 8 ? nil : UInt32(trimmed.isEmpty ? "0" : String(trimmed), radix: radix)
        guard let value = number, value <= 0x10FFFF else { return ["\u{FFFD}"] }
        if let replacement = tables.invalidCharrefs[value] {
            return Array(replacement.unicodeScalars)
        }
        if (0xD800...0xDFFF).contains(value) {
            return ["\u{FFFD}"]
        }
        if tables.invalidCodepoints.contains(value) {
            return []
        }
        return Unicode.Scalar(value).map { [$0] } ?? ["\u{FFFD}"]
    }

    private func namedReference(_ name: [Unicode.Scalar]) -> [Unicode.Scalar] {
        let key = String(String.UnicodeScalarView(name))
        if let replacement = tables.html5[key] {
            return Array(replacement.unicodeScalars)
        }
        var length = name.count - 1
        while length > 1 {
            let prefix = String(String.UnicodeScalarView(name[0..<length]))
            if let replacement = tables.html5[prefix] {
                return Array(replacement.unicodeScalars) + name[length...]
            }
            length -= 1
        }
        return ["&"] + name
    }

    // MARK: - lower

    /// Python's `str.lower`: the full lowercase mapping, and final sigma where a capital sigma ends a word.
    private func lowercased(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(text.count)
        for (i, scalar) in text.enumerated() {
            if scalar.value == 0x03A3 {
                out.append(isFinalSigma(text, at: i) ? "\u{03C2}" : "\u{03C3}")
            } else if let lower = tables.lowercase[scalar.value] {
                out += lower
            } else {
                out.append(scalar)
            }
        }
        return out
    }

    /// `\p{cased}\p{case-ignorable}* U+03A3 !(\p{case-ignorable}* \p{cased})`, as CPython tests it.
    private func isFinalSigma(_ text: [Unicode.Scalar], at index: Int) -> Bool {
        var j = index - 1
        while j >= 0, text[j].properties.isCaseIgnorable { j -= 1 }
        guard j >= 0, text[j].properties.isCased else { return false }
        var k = index + 1
        while k < text.count, text[k].properties.isCaseIgnorable { k += 1 }
        return k == text.count || !text[k].properties.isCased
    }
}

private func isASCIIAlphanumeric(_ scalar: Unicode.Scalar) -> Bool {
    scalar.isASCII && (scalar.properties.isAlphabetic || scalar.isASCIIDigit)
}

private extension Unicode.Scalar {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
    var isASCIIHexDigit: Bool { isASCIIDigit || ("a"..."f").contains(self) || ("A"..."F").contains(self) }
}

private extension String {
    /// The string these bytes spell in strict UTF-8, or nil when they are not valid UTF-8.
    init?(validatingUTF8Bytes bytes: [UInt8]) {
        var iterator = bytes.makeIterator()
        var decoder = UTF8()
        var scalars = String.UnicodeScalarView()
        decoding: while true {
            switch decoder.decode(&iterator) {
            case let .scalarValue(scalar): scalars.append(scalar)
            case .emptyInput: break decoding
            case .error: return nil
            }
        }
        self = String(scalars)
    }
}

/// Sorted, disjoint closed ranges of code points.
struct ScalarSet: Sendable {
    let ranges: [ClosedRange<UInt32>]

    init(_ pairs: [[UInt32]]) {
        ranges = pairs.map { $0[0]...$0[1] }
    }

    func contains(_ value: UInt32) -> Bool {
        var low = 0, high = ranges.count - 1
        while low <= high {
            let mid = (low + high) / 2
            if value < ranges[mid].lowerBound {
                high = mid - 1
            } else if value > ranges[mid].upperBound {
                low = mid + 1
            } else {
                return true
            }
        }
        return false
    }
}

/// `clip_text_tables.json`, written by `scripts/make_swift_vectors.py` from Python's own tables.
struct TextTables: Decodable, Sendable {
    let html5: [String: String]
    let ftfyEntities: [String: String]
    let invalidCharrefs: [UInt32: String]
    let invalidCodepoints: Set<UInt32>
    let ligatures: [UInt32: [Unicode.Scalar]]
    let widthMap: [UInt32: [Unicode.Scalar]]
    let controlChars: Set<UInt32>
    let windows1252: [String]  // byte -> character, ftfy's sloppy-windows-1252
    let lowercase: [UInt32: [Unicode.Scalar]]
    let pythonSpace: ScalarSet
    let regexSpace: ScalarSet
    let letters: ScalarSet
    let numbers: ScalarSet
    private let windows1252Encoder: [UInt32: UInt8]

    enum CodingKeys: String, CodingKey {
        case html5
        case ftfyEntities = "ftfy_entities"
        case invalidCharrefs = "html_invalid_charrefs"
        case invalidCodepoints = "html_invalid_codepoints"
        case ligatures
        case widthMap = "width_map"
        case controlChars = "control_chars"
        case windows1252 = "sloppy_windows_1252"
        case lowercase
        case pythonSpace = "python_space"
        case regexSpace = "regex_space"
        case letters = "regex_letters"
        case numbers = "regex_numbers"
    }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func scalarMap(_ key: CodingKeys) throws -> [UInt32: [Unicode.Scalar]] {
            let raw = try c.decode([String: String].self, forKey: key)
            return Dictionary(uniqueKeysWithValues: raw.compactMap { k, v in UInt32(k).map { ($0, Array(v.unicodeScalars)) } })
        }
        html5 = try c.decode([String: String].self, forKey: .html5)
        ftfyEntities = try c.decode([String: String].self, forKey: .ftfyEntities)
        let charrefs = try c.decode([String: String].self, forKey: .invalidCharrefs)
        invalidCharrefs = Dictionary(uniqueKeysWithValues: charrefs.compactMap { k, v in UInt32(k).map { ($0, v) } })
        invalidCodepoints = Set(try c.decode([UInt32].self, forKey: .invalidCodepoints))
        ligatures = try scalarMap(.ligatures)
        widthMap = try scalarMap(.widthMap)
        controlChars = Set(try c.decode([UInt32].self, forKey: .controlChars))
        windows1252 = try c.decode([String].self, forKey: .windows1252)
        guard windows1252.count == 256, windows1252.allSatisfy({ $0.unicodeScalars.count == 1 }) else {
            throw SUNEdgeError.tokenizer("clip_text_tables.json: sloppy_windows_1252 must map 256 bytes to one character each")
        }
        var encoder: [UInt32: UInt8] = [:]
        for (byte, character) in windows1252.enumerated() {
            encoder[character.unicodeScalars.first!.value] = UInt8(byte)
        }
        windows1252Encoder = encoder
        lowercase = try scalarMap(.lowercase)
        pythonSpace = ScalarSet(try c.decode([[UInt32]].self, forKey: .pythonSpace))
        regexSpace = ScalarSet(try c.decode([[UInt32]].self, forKey: .regexSpace))
        letters = ScalarSet(try c.decode([[UInt32]].self, forKey: .letters))
        numbers = ScalarSet(try c.decode([[UInt32]].self, forKey: .numbers))
    }

    /// The character Windows-1252 (sloppy) gives `byte`.
    func windows1252Scalar(_ byte: UInt8) -> [Unicode.Scalar] {
        Array(windows1252[Int(byte)].unicodeScalars)
    }

    /// The Windows-1252 (sloppy) bytes of `text`, or nil when a character is not in it.
    func windows1252Bytes(_ text: [Unicode.Scalar]) -> [UInt8]? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.count)
        for scalar in text {
            guard let byte = windows1252Encoder[scalar.value] else { return nil }
            bytes.append(byte)
        }
        return bytes
    }
}
