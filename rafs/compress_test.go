package rafs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

func TestCompressRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 100_000)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog\n"), 3000)
	for _, c := range []Compressor{CompressNone, CompressZstd, CompressLZ4Block, CompressGzip} {
		for name, src := range map[string][]byte{"text": text, "random": random, "one": {42}} {
			packed, err := Compress(c, nil, src)
			if errors.Is(err, ErrNotSmaller) {
				if name == "text" && c != CompressNone {
					t.Errorf("%v/%s: text did not compress", c, name)
				}
				continue
			}
			if err != nil {
				t.Fatalf("%v/%s: %v", c, name, err)
			}
			out := make([]byte, len(src))
			if err := Decompress(c, out, packed); err != nil {
				t.Fatalf("%v/%s: %v", c, name, err)
			}
			if !bytes.Equal(out, src) {
				t.Fatalf("%v/%s: round trip differs", c, name)
			}
			// A wrong expected size must be an error, never short or padded data.
			if c != CompressNone {
				if err := Decompress(c, make([]byte, len(src)+1), packed); err == nil {
					t.Errorf("%v/%s: decompressing into a larger buffer succeeded", c, name)
				}
				if err := Decompress(c, make([]byte, len(src)), packed[:len(packed)/2]); err == nil {
					t.Errorf("%v/%s: truncated input decompressed", c, name)
				}
			}
		}
	}
}

// The nydus fixture blob's first chunk is a zstd frame of lib.rs (fixture README).
func TestDecompressFixtureChunk(t *testing.T) {
	blob, err := os.ReadFile(testutil.NydusFixture(t, "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"))
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 16931)
	if err := Decompress(CompressZstd, out, blob[0:4828]); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(out)
	if got, want := hex.EncodeToString(sum[:]), "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69"; got != want {
		t.Fatalf("lib.rs sha256 = %s, want %s", got, want)
	}
}
