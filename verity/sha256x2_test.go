package verity

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"testing"
)

// TestSum256x2 checks the two-message SHA-256 against crypto/sha256 for
// the lengths it is used with and around them, with and without salts.
func TestSum256x2(t *testing.T) {
	if !haveSum256x2 {
		t.Log("no SHA extensions here: testing the fallback only")
	}
	for _, saltLen := range []int{0, 1, 7, 32, 54, 55, 56, 63, 64, 100} {
		salt := randomBytes(uint64(saltLen), saltLen)
		for _, n := range []int{0, 1, 55, 64, 100, 128, 192, 448, 512, 576, 1024, 4096, 8192, 65536} {
			for seed := uint64(0); seed < 3; seed++ {
				a, b := randomBytes(seed+uint64(n), n), randomBytes(seed+uint64(n)+100, n)
				if seed == 2 {
					b = a // the same message twice
				}
				var d1, d2 [32]byte
				sum256x2(d1[:], d2[:], salt, a, b)
				if w1, w2 := saltedSHA256(salt, a), saltedSHA256(salt, b); d1 != w1 || d2 != w2 {
					t.Fatalf("salt %d, len %d, seed %d: got %x %x, want %x %x", saltLen, n, seed, d1, d2, w1, w2)
				}
			}
		}
	}
}

func saltedSHA256(salt, b []byte) [32]byte {
	return sha256.Sum256(append(append([]byte(nil), salt...), b...))
}

func FuzzSum256x2(f *testing.F) {
	f.Add([]byte(""), []byte("a"), []byte("b"))
	f.Add(make([]byte, 32), make([]byte, 512), make([]byte, 512))
	f.Fuzz(func(t *testing.T, salt, a, b []byte) {
		n := min(len(a), len(b))
		a, b = a[:n], b[:n]
		var d1, d2 [32]byte
		sum256x2(d1[:], d2[:], salt, a, b)
		if w1, w2 := saltedSHA256(salt, a), saltedSHA256(salt, b); d1 != w1 || d2 != w2 {
			t.Fatalf("salt %d, len %d: got %x %x, want %x %x", len(salt), n, d1, d2, w1, w2)
		}
	})
}

// BenchmarkSum256x2 is two data blocks at a time, to set against
// BenchmarkBlockHash (one at a time).
func BenchmarkSum256x2(b *testing.B) {
	for _, dbs := range []int{4096, 512} {
		b.Run(fmt.Sprintf("dbs=%d", dbs), func(b *testing.B) {
			blocks := randomBytes(3, 2*dbs)
			var d1, d2 [32]byte
			b.SetBytes(int64(2 * dbs))
			for b.Loop() {
				sum256x2(d1[:], d2[:], nil, blocks[:dbs], blocks[dbs:])
			}
			if bytes.Equal(d1[:], d2[:]) {
				b.Fatal("two different blocks, one digest")
			}
		})
	}
}
