@testable import SUNEdgeKit
import XCTest

/// tokens.json: the ids sun-edge's Python tokenizer gives 30+ varied prompts (punctuation, unicode, HTML entities,
/// mojibake, whitespace, special tokens, prompts past 77 tokens).
final class TokenizerTests: XCTestCase {
    struct TokenVectors: Decodable {
        struct Case: Decodable {
            let prompt: String
            let clean: String
            let tokens: [Int]
            let ids: [Int]
            let truncated: String?
        }

        let vocab: String
        let merges: String
        let contextLength: Int
        let bos: Int
        let eos: Int
        let cases: [Case]

        enum CodingKeys: String, CodingKey {
            case vocab, merges, bos, eos, cases
            case contextLength = "context_length"
        }
    }

    static var shared: (CLIPTokenizer, TokenVectors)?

    func tokenizer() throws -> (CLIPTokenizer, TokenVectors) {
        if let shared = Self.shared { return shared }
        let vectors = try Vectors.load(TokenVectors.self, from: "tokens.json")
        let tokenizer = try CLIPTokenizer(vocabURL: Vectors.repositoryFile(vectors.vocab),
                                          mergesURL: Vectors.repositoryFile(vectors.merges))
        Self.shared = (tokenizer, vectors)
        return (tokenizer, vectors)
    }

    func testVocabularyIsCLIPs() throws {
        let (tokenizer, vectors) = try tokenizer()
        XCTAssertEqual(tokenizer.vocabSize, 49408)
        XCTAssertEqual(tokenizer.bosID, vectors.bos)
        XCTAssertEqual(tokenizer.eosID, vectors.eos)
        XCTAssertGreaterThanOrEqual(vectors.cases.count, 30)
    }

    func testCleanTextEqualsPython() throws {
        let (tokenizer, vectors) = try tokenizer()
        for item in vectors.cases {
            XCTAssertEqual(Array(tokenizer.clean(item.prompt).unicodeScalars), Array(item.clean.unicodeScalars),
                           "clean_text of \(item.prompt.debugDescription)")
        }
    }

    func testTokensAndIdsEqualPython() throws {
        let (tokenizer, vectors) = try tokenizer()
        for item in vectors.cases {
            XCTAssertEqual(tokenizer.tokenize(item.prompt), item.tokens, "BPE of \(item.prompt.debugDescription)")
            let ids = tokenizer.encode(item.prompt, maxLength: vectors.contextLength)
            XCTAssertEqual(ids, item.ids, "ids of \(item.prompt.debugDescription)")
            XCTAssertEqual(ids.count, 77)
            XCTAssertEqual(tokenizer.truncatedText(item.prompt), item.truncated,
                           "cut text of \(item.prompt.debugDescription)")
        }
    }

    func testPaddingAndDecode() throws {
        let (tokenizer, _) = try tokenizer()
        XCTAssertEqual(Array(tokenizer.encode("a photo of a cat").prefix(8)), [49406, 320, 1125, 539, 320, 2368, 49407, 49407])
        XCTAssertEqual(tokenizer.encode(""), [49406] + Array(repeating: 49407, count: 76))
        XCTAssertEqual(tokenizer.decode(tokenizer.encode("A Photo of a CAT!")), "a photo of a cat !")
    }

    func testMissingTokenizerFilesSayWhat() throws {
        let missing = FileManager.default.temporaryDirectory.appendingPathComponent("no-such-vocab.json")
        XCTAssertThrowsError(try CLIPTokenizer(vocabURL: missing, mergesURL: missing)) { error in
            XCTAssertTrue(error.localizedDescription.contains("no-such-vocab.json does not exist"),
                          error.localizedDescription)
        }
    }
}
