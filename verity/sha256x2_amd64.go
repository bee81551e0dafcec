//go:build amd64 && !purego

package verity

import "github.com/klauspost/cpuid/v2"

// haveSum256x2 says whether sum256x2 runs on the SHA extensions.
//
// Why our own assembly: crypto/sha256 hashes one message at a time, and
// one message's SHA256RNDS2 chain leaves the unit idle between rounds. Two
// interleaved messages use those gaps: BenchmarkSum256x2 gives 2.94 GB/s
// per core on 4 KiB blocks against BenchmarkBlockHash's 1.65 GB/s (512 B:
// 2.45 against 1.33), on this machine's AMD EPYC. No library we could use
// does this: minio/sha256-simd's AVX-512 multi-buffer server goes through
// channels per write and managed 0.8 to 2.1 GB/s even on 0.5 to 1 MiB
// messages. TestSum256x2 and FuzzSum256x2 check it against crypto/sha256.
var haveSum256x2 = cpuid.CPU.Supports(cpuid.SHA, cpuid.SSSE3, cpuid.AVX)

// blocks2 runs the compression function over n 64-byte blocks at p and at
// q, for the two states in state (see sha256x2_amd64.s).
//
//go:noescape
func blocks2(state *[16]uint32, p, q *byte, n int)
