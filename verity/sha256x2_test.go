package verity

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"testing"
)

// TestSum256x2 checks the two-message SHA-256 against crypto/sha256 for
// every length it is used with and around them.
func TestSum256x2(t *testing.T) {
	if !haveSum256x2 {
		t.Log("no SHA extensions here: testing the fallback only")
	}
	for _, n := range []int{0, 64, 128, 192, 448, 512, 576, 1024, 4096, 8192, 65536} {
		for seed := uint64(0); seed < 4; seed++ {
			a, b := randomBytes(seed+uint64(n), n), randomBytes(seed+uint64(n)+100, n)
			if seed == 3 {
				b = a // the same message twice
			}
			var d1, d2 [32]byte
			sum256x2(d1[:], d2[:], a, b)
			if w1, w2 := sha256.Sum256(a), sha256.Sum256(b); d1 != w1 || d2 != w2 {
				t.Fatalf("len %d seed %d: got %x %x, want %x %x", n, seed, d1, d2, w1, w2)
			}
		}
	}
}

func FuzzSum256x2(f *testing.F) {
	f.Add([]byte("a"), []byte("b"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		n := min(len(a), len(b)) &^ 63
		a, b = a[:n], b[:n]
		var d1, d2 [32]byte
		sum256x2(d1[:], d2[:], a, b)
		if w1, w2 := sha256.Sum256(a), sha256.Sum256(b); d1 != w1 || d2 != w2 {
			t.Fatalf("len %d: got %x %x, want %x %x", n, d1, d2, w1, w2)
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
				sum256x2(d1[:], d2[:], blocks[:dbs], blocks[dbs:])
			}
			if bytes.Equal(d1[:], d2[:]) {
				b.Fatal("two different blocks, one digest")
			}
		})
	}
}
