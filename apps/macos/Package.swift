// swift-tools-version:5.9
// SUNEdgeKit: run sun-edge Core ML bundles (SpeedUpNet, 4 UNet calls per image) from Swift.
// No dependencies outside Apple's SDKs: Core ML, CoreGraphics, ImageIO, CryptoKit, SwiftUI (sample only).

import PackageDescription

let package = Package(
    name: "SUNEdgeKit",
    platforms: [.macOS(.v13), .iOS("16.2")],
    products: [
        .library(name: "SUNEdgeKit", targets: ["SUNEdgeKit"]),
        .executable(name: "sun-edge-swift", targets: ["SUNEdgeCLI"]),
        .executable(name: "SUNEdgeSample", targets: ["SUNEdgeSample"]),
    ],
    targets: [
        .target(
            name: "SUNEdgeKit",
            resources: [.copy("Resources/clip_text_tables.json")]
        ),
        .executableTarget(name: "SUNEdgeCLI", dependencies: ["SUNEdgeKit"]),
        .executableTarget(name: "SUNEdgeSample", dependencies: ["SUNEdgeKit"]),
        .testTarget(
            name: "SUNEdgeKitTests",
            dependencies: ["SUNEdgeKit"],
            resources: [.copy("Resources")]
        ),
    ]
)
