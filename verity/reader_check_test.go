package verity

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"testing"
)

func readerParams(alg string, dataBlock int, blocks uint64, salt []byte) Params {
	return Params{Algorithm: alg, DataBlockSize: dataBlock, HashBlockSize: 4096, DataBlocks: blocks, Salt: salt}
}

func TestReaderReturnsVerifiedBytes(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Params
	}{
		{"sha256-4k", readerParams("sha256", 4096, 700, nil)},
		{"sha256-512-salt", readerParams("sha256", 512, 3000, []byte("salty"))},
		{"sha1-4k", readerParams("sha1", 4096, 300, nil)},
		{"one-block", readerParams("sha256", 4096, 1, nil)},
		{"nydus", NydusParams(4096*200, 4096)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := make([]byte, tc.p.DataSize())
			rng := rand.New(rand.NewSource(1))
			rng.Read(data)
			tree, err := Build(context.Background(), bytes.NewReader(data), tc.p, nil)
			if err != nil {
				t.Fatal(err)
			}
			// Through the stored-tree path: the tree at HashOffset of a hash device.
			hash := make([]byte, int(tc.p.HashOffset)+len(tree.HashArea))
			copy(hash[tc.p.HashOffset:], tree.HashArea)
			r, err := NewReader(bytes.NewReader(data), bytes.NewReader(hash), tc.p, tree.Root)
			if err != nil {
				t.Fatal(err)
			}
			if r.Size() != int64(len(data)) {
				t.Fatalf("size %d, want %d", r.Size(), len(data))
			}
			for i := 0; i < 200; i++ {
				off := rng.Int63n(int64(len(data)))
				n := rng.Intn(3*tc.p.DataBlockSize) + 1
				p := make([]byte, n)
				got, err := r.ReadAt(p, off)
				end := min(off+int64(n), int64(len(data)))
				if got != int(end-off) || (err != nil && !(errors.Is(err, io.EOF) && end < off+int64(n))) {
					t.Fatalf("ReadAt(%d, %d) = %d, %v", n, off, got, err)
				}
				if !bytes.Equal(p[:got], data[off:end]) {
					t.Fatalf("ReadAt(%d, %d): wrong bytes", n, off)
				}
			}

			// A flipped data byte fails the reads of its block only.
			bad := bytes.Clone(data)
			at := len(bad) - tc.p.DataBlockSize/2
			bad[at] ^= 1
			r, err = NewTreeReader(bytes.NewReader(bad), tree)
			if err != nil {
				t.Fatal(err)
			}
			var ce *CorruptionError
			if _, err := r.ReadAt(make([]byte, 10), int64(at-3)); !errors.As(err, &ce) || ce.Kind != BadDataBlock {
				t.Fatalf("read over a flipped byte: %v, want a bad data block", err)
			}
			if tc.p.DataBlocks > 1 {
				p := make([]byte, tc.p.DataBlockSize)
				if _, err := r.ReadAt(p, 0); err != nil || !bytes.Equal(p, data[:len(p)]) {
					t.Fatalf("read of a good block beside a bad one: %v", err)
				}
			}

			// A wrong root or a flipped hash-tree byte fails the open.
			root := bytes.Clone(tree.Root)
			root[0] ^= 1
			r, err = NewReader(bytes.NewReader(data), bytes.NewReader(hash), tc.p, root)
			if tc.p.DataBlocks == 1 {
				// No tree: the root is the block's digest, checked on read.
				if err == nil {
					_, err = r.ReadAt(make([]byte, 1), 0)
				}
				if !errors.As(err, &ce) || ce.Kind != BadDataBlock {
					t.Fatalf("wrong root of one block: %v", err)
				}
			} else if !errors.As(err, &ce) || ce.Kind != BadRoot {
				t.Fatalf("wrong root: %v", err)
			}
			if len(tree.HashArea) > 4096 {
				hash[len(hash)-1] ^= 1 // the last level-1 block
				if _, err := NewReader(bytes.NewReader(data), bytes.NewReader(hash), tc.p, tree.Root); !errors.As(err, &ce) || ce.Kind != BadHashBlock {
					t.Fatalf("flipped hash byte: %v", err)
				}
			}
		})
	}
}
