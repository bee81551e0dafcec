package verity

import (
	"bytes"
	"context"
	"fmt"
	"testing"
)

// BenchmarkBuild streams 64 MiB of random data through a Builder in 1 MiB
// writes (the way the exporter feeds it) and reports data MB/s.
func BenchmarkBuild(b *testing.B) {
	const size = 64 << 20
	data := randomBytes(1, size)
	for _, dbs := range []int{4096, 512} {
		b.Run(fmt.Sprintf("dbs=%d", dbs), func(b *testing.B) {
			p := Params{Algorithm: "sha256", DataBlockSize: dbs, HashBlockSize: 4096, DataBlocks: size / uint64(dbs)}
			b.SetBytes(size)
			b.ReportAllocs()
			for b.Loop() {
				bl, err := NewBuilder(p, nil)
				if err != nil {
					b.Fatal(err)
				}
				for off := 0; off < size; off += 1 << 20 {
					if _, err := bl.Write(data[off : off+1<<20]); err != nil {
						b.Fatal(err)
					}
				}
				if _, err := bl.Finish(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkVerify checks the same 64 MiB against its tree.
func BenchmarkVerify(b *testing.B) {
	const size = 64 << 20
	data := randomBytes(1, size)
	for _, dbs := range []int{4096, 512} {
		b.Run(fmt.Sprintf("dbs=%d", dbs), func(b *testing.B) {
			p := Params{Algorithm: "sha256", DataBlockSize: dbs, HashBlockSize: 4096, DataBlocks: size / uint64(dbs)}
			tree, err := Build(context.Background(), bytes.NewReader(data), p, nil)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(size)
			for b.Loop() {
				if err := Verify(context.Background(), bytes.NewReader(data), bytes.NewReader(tree.HashArea), p, tree.Root); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkBlockHash is the single-core ceiling: sha256 of one data block.
func BenchmarkBlockHash(b *testing.B) {
	for _, dbs := range []int{4096, 512} {
		b.Run(fmt.Sprintf("dbs=%d", dbs), func(b *testing.B) {
			block := randomBytes(2, dbs)
			dst := make([]byte, 32)
			h := blockHasher{sha: true}
			b.SetBytes(int64(dbs))
			for b.Loop() {
				h.sum(dst, block)
			}
		})
	}
}
