package verity

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
)

// stagedFixture writes blocks 4 KiB blocks of random data to a file and
// returns it open for reading and writing, with appended-tree parameters.
func stagedFixture(t *testing.T, blocks uint64) (*os.File, []byte, Params) {
	t.Helper()
	data := make([]byte, blocks*4096)
	rand.NewChaCha8([32]byte{3}).Read(data)
	path := filepath.Join(t.TempDir(), "data.img")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	p := Params{Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: blocks}
	p.HashOffset = AppendedHashOffset(p.DataSize(), p.HashBlockSize)
	return f, data, p
}

func TestBuildIntoAppends(t *testing.T) {
	f, data, p := stagedFixture(t, 3000)
	want, err := Build(context.Background(), bytes.NewReader(data), p, nil)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := BuildInto(context.Background(), f, p, f)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tree.Root, want.Root) {
		t.Fatalf("root %x, want %x", tree.Root, want.Root)
	}
	got, _ := os.ReadFile(f.Name())
	if !bytes.Equal(got[:len(data)], data) || !bytes.Equal(got[p.HashOffset:], want.HashArea) {
		t.Fatalf("file of %d bytes is not the data then the tree (%d + %d bytes)", len(got), len(data), len(want.HashArea))
	}
	checkNoTemps(t, filepath.Dir(f.Name()))
}

// A cancelled build leaves the file as it was: Build writing into the data
// file grew it by part of a tree.
func TestBuildIntoCancelledLeavesFile(t *testing.T) {
	f, data, p := stagedFixture(t, 40*batchTarget/4096+5)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := BuildInto(ctx, f, p, f, WithProgress(func(done int64) {
		if done >= batchTarget {
			cancel()
		}
	}))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	got, _ := os.ReadFile(f.Name())
	if !bytes.Equal(got, data) {
		t.Fatalf("the data file changed: %d bytes, was %d", len(got), len(data))
	}
	checkNoTemps(t, filepath.Dir(f.Name()))
}

// A failed copy of the finished tree cuts the file back.
func TestCopyTreeFailureTruncates(t *testing.T) {
	f, data, p := stagedFixture(t, 10)
	tmp, err := os.CreateTemp(t.TempDir(), "tree")
	if err != nil {
		t.Fatal(err)
	}
	defer tmp.Close()
	// Half a tree: the copy comes up short.
	if _, err := tmp.Write(make([]byte, p.TreeSize()/2)); err != nil {
		t.Fatal(err)
	}
	if err := copyTree(tmp, f, int64(len(data)), p); err == nil {
		t.Fatal("copying half a tree succeeded")
	}
	if st, _ := f.Stat(); st.Size() != int64(len(data)) {
		t.Fatalf("file is %d bytes after a failed copy, was %d", st.Size(), len(data))
	}
}

func checkNoTemps(t *testing.T, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if atomicfile.IsTemp(e.Name()) {
			t.Errorf("temporary left: %s", e.Name())
		}
	}
}
