package blockdev

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/verity"
)

// randomDevice returns a device with data extents separated by large holes,
// and the same bytes laid out flat.
func randomDevice(t *testing.T, seed uint64, blockSize int64) (*Composed, []byte) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed+1))
	size := int64(24 << 20)
	flat := make([]byte, size)
	var extents []Extent
	for _, span := range [][2]int64{{0, 20480}, {2 << 20, 5<<20 + 3*blockSize}, {16 << 20, 8 << 20}} {
		data := make([]byte, span[1])
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		if len(data) > 2<<20 {
			clear(data[len(data)/2 : len(data)/2+(1<<20)]) // zeros inside data stay holes too
		}
		copy(flat[span[0]:], data)
		extents = append(extents, Extent{Name: "e", Offset: span[0], Length: span[1], Source: bytes.NewReader(data)})
	}
	dev, err := New(size, uint32(blockSize), extents)
	if err != nil {
		t.Fatal(err)
	}
	return dev, flat
}

func TestExportIsSparseAndExact(t *testing.T) {
	for _, noSync := range []bool{false, true} {
		t.Run(fmt.Sprintf("NoSync=%v", noSync), func(t *testing.T) {
			dev, flat := randomDevice(t, 1, 4096)
			path := filepath.Join(t.TempDir(), "disk.img")
			var progress []int64
			res, err := Export(context.Background(), dev, path, ExportOptions{NoSync: noSync, Progress: func(n int64) { progress = append(progress, n) }})
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if res.Size != int64(len(flat)) || !bytes.Equal(got, flat) {
				t.Fatalf("exported %d bytes (result says %d), want the %d flat bytes", len(got), res.Size, len(flat))
			}
			var st syscall.Stat_t
			if err := syscall.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			// Data is 20 KiB + ~5 MiB + 8 MiB, less 2 MiB of zeros; the file is 24 MiB.
			if allocated := st.Blocks * 512; allocated > 13<<20 {
				t.Errorf("export allocates %d bytes; holes were written out", allocated)
			}
			if len(progress) == 0 || progress[len(progress)-1] != int64(len(flat)) {
				t.Errorf("progress ended at %v, want %d", progress, len(flat))
			}
			if leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".disk.img.tmp-*")); len(leftovers) != 0 {
				t.Errorf("temp files left behind: %v", leftovers)
			}
		})
	}
}

// A read error must fail the export and leave nothing under the final name.
func TestExportFailureLeavesNothing(t *testing.T) {
	dev, err := New(1<<20, 4096, []Extent{{Name: "broken", Offset: 4096, Length: 8192, Source: failingReader{}}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if _, err := Export(context.Background(), dev, path, ExportOptions{}); !errors.Is(err, errBroken) {
		t.Fatalf("err = %v, want the source's error", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("export left %v behind", entries)
	}
}

var errBroken = errors.New("backend died")

type failingReader struct{}

func (failingReader) ReadAt([]byte, int64) (int, error) { return 0, errBroken }

// The appended tree must be the one veritysetup itself accepts.
func TestExportVerityAcceptedByVeritysetup(t *testing.T) {
	testutil.RequireTool(t, "veritysetup")
	for _, bs := range []int64{512, 4096} {
		dev, _ := randomDevice(t, uint64(bs), bs)
		path := filepath.Join(t.TempDir(), "disk.img")
		p := verity.NydusParams(uint64(dev.Size()), int(bs))
		p.Compat = verity.Standard
		res, err := Export(context.Background(), dev, path, ExportOptions{Verity: &p})
		if err != nil {
			t.Fatal(err)
		}
		if st, _ := os.Stat(path); st.Size() != res.Size {
			t.Fatalf("file is %d bytes, result says %d", st.Size(), res.Size)
		}
		args := append([]string{"verify"}, p.VeritysetupArgs()...)
		args = append(args, path, path, res.Tree.RootHex())
		if out, err := exec.Command("veritysetup", args...).CombinedOutput(); err != nil {
			t.Fatalf("bs %d: veritysetup %s: %v\n%s", bs, strings.Join(args, " "), err, out)
		}
		// One flipped data byte must make veritysetup reject the file.
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		b := []byte{0}
		f.ReadAt(b, 3<<20)
		b[0] ^= 0x40
		f.WriteAt(b, 3<<20)
		f.Close()
		if out, err := exec.Command("veritysetup", args...).CombinedOutput(); err == nil {
			t.Fatalf("bs %d: veritysetup accepted a corrupted disk: %s", bs, out)
		}
		t.Logf("bs %d: %d data blocks, root %s (hash offset %s)", bs, p.DataBlocks, res.Tree.RootHex(), strconv.FormatUint(p.HashOffset, 10))
	}
}
