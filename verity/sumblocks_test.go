package verity

import (
	"bytes"
	"crypto/sha256"
	"math/rand/v2"
	"testing"
)

// SumBlocks gives crypto/sha256's digest of every whole block, paired or
// not (odd counts, a partial tail, blocks under 64 bytes).
func TestSumBlocks(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	for _, bs := range []int{32, 512, 4096} {
		for _, n := range []int{0, 1, 2, 3, 17} {
			data := make([]byte, n*bs+bs/2)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			prefix := []byte("kept")
			got := SumBlocks(bytes.Clone(prefix), data, bs)
			want := prefix
			for i := range n {
				d := sha256.Sum256(data[i*bs : (i+1)*bs])
				want = append(want, d[:]...)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("block size %d, %d blocks: digests differ", bs, n)
			}
		}
	}
}

func BenchmarkSumBlocks512(b *testing.B) {
	data := make([]byte, 1<<20)
	dst := make([]byte, 0, len(data)/512*32)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		SumBlocks(dst[:0], data, 512)
	}
}
