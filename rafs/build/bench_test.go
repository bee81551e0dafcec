package build

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// Benchmarks run on generated data in the page cache. The data is made once
// per test binary and shared; sizes are set by environment variables so
// scripts/bench-build.sh can scale them:
// RAFS_BENCH_TAR_MB (default 320), RAFS_BENCH_DIR_MB (default 96).

var benchData struct {
	once            sync.Once
	dir, tar        string
	dirSize, tarLen int64
	err             error
}

func envMB(name string, def int) int64 {
	var n int
	if _, err := fmt.Sscan(os.Getenv(name), &n); err == nil && n > 0 {
		return int64(n) << 20
	}
	return int64(def) << 20
}

// benchFiles yields a deterministic mix of file sizes and contents: text,
// random bytes and zeros, 1 KiB to 4 MiB, in directories of 100 files.
func benchFiles(total int64, emit func(name string, data []byte) error) error {
	rng := rand.New(rand.NewPCG(3, 4))
	random := make([]byte, 8<<20)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := []byte(strings.Repeat("lorem ipsum dolor sit amet, consectetur adipiscing elit; ", 8<<20/57+1))[:8<<20]
	zeros := make([]byte, 5<<20)
	var done int64
	for i := 0; done < total; i++ {
		size := int64(1024) << rng.IntN(13) // 1 KiB .. 4 MiB
		size = min(size+int64(rng.IntN(1024)), total-done)
		var data []byte
		switch i % 4 {
		case 0, 1:
			off := rng.IntN(len(text) - int(size))
			data = text[off : off+int(size)]
		case 2:
			off := rng.IntN(len(random) - int(size))
			data = random[off : off+int(size)]
		default:
			data = zeros[:size]
		}
		if err := emit(fmt.Sprintf("d%03d/f%05d", i/100, i), data); err != nil {
			return err
		}
		done += size
	}
	return nil
}

func setupBenchData(b *testing.B) {
	b.Helper()
	benchData.once.Do(func() {
		root, err := os.MkdirTemp("", "rafs-bench-")
		if err != nil {
			benchData.err = err
			return
		}
		benchData.dir = filepath.Join(root, "dir")
		benchData.err = benchFiles(envMB("RAFS_BENCH_DIR_MB", 96), func(name string, data []byte) error {
			p := filepath.Join(benchData.dir, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			benchData.dirSize += int64(len(data))
			return os.WriteFile(p, data, 0o644)
		})
		if benchData.err != nil {
			return
		}
		benchData.tar = filepath.Join(root, "layer.tar")
		f, err := os.Create(benchData.tar)
		if err != nil {
			benchData.err = err
			return
		}
		tw := tar.NewWriter(f)
		benchData.err = benchFiles(envMB("RAFS_BENCH_TAR_MB", 320), func(name string, data []byte) error {
			if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data))}); err != nil {
				return err
			}
			_, err := tw.Write(data)
			return err
		})
		if err := tw.Close(); benchData.err == nil {
			benchData.err = err
		}
		if err := f.Close(); benchData.err == nil {
			benchData.err = err
		}
		st, err := os.Stat(benchData.tar)
		if err == nil {
			benchData.tarLen = st.Size()
		}
	})
	if benchData.err != nil {
		b.Fatal(benchData.err)
	}
}

func cleanupBenchData() {
	if benchData.dir != "" {
		os.RemoveAll(filepath.Dir(benchData.dir))
	}
}

// BenchmarkFromTar is a whole tarfs build from a tar file: index the
// headers, hash the tar for its id (unless given), link it into the blob
// directory, write the bootstrap. MB/s is of tar bytes.
func BenchmarkFromTar(b *testing.B) {
	setupBenchData(b)
	for _, named := range []bool{false, true} {
		name := "hashed"
		if named {
			name = "blob-id-given"
		}
		b.Run(name, func(b *testing.B) {
			b.SetBytes(benchData.tarLen)
			for b.Loop() {
				f, err := os.Open(benchData.tar)
				if err != nil {
					b.Fatal(err)
				}
				opts := DefaultOptions(b.TempDir())
				if named {
					opts.BlobID = strings.Repeat("ab", 32)
				}
				if _, err := FromTar(context.Background(), f, io.Discard, opts); err != nil {
					b.Fatal(err)
				}
				f.Close()
			}
		})
	}
}

// countingReaderAt counts the bytes read through it.
type countingReaderAt struct {
	r io.ReaderAt
	n atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n.Add(int64(n))
	return n, err
}

// BenchmarkIndexTar is the header walk alone, and reports how many bytes of
// the tar it read (read-B/op) against the tar's size.
func BenchmarkIndexTar(b *testing.B) {
	setupBenchData(b)
	f, err := os.Open(benchData.tar)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.SetBytes(benchData.tarLen)
	var read int64
	for b.Loop() {
		cr := &countingReaderAt{r: f}
		if _, err := indexTar(context.Background(), cr, benchData.tarLen); err != nil {
			b.Fatal(err)
		}
		read += cr.n.Load()
	}
	b.ReportMetric(float64(read)/float64(b.N), "read-B/op")
}

// BenchmarkFromDir is a whole directory build per compressor: read, digest
// (blake3), compress in parallel, write the blob and the bootstrap. MB/s is
// of file bytes.
func BenchmarkFromDir(b *testing.B) {
	setupBenchData(b)
	for _, c := range []rafs.Compressor{rafs.CompressZstd, rafs.CompressLZ4Block, rafs.CompressGzip, rafs.CompressNone} {
		b.Run(c.String(), func(b *testing.B) {
			b.SetBytes(benchData.dirSize)
			var blobBytes int64
			for b.Loop() {
				opts := DefaultOptions(b.TempDir())
				opts.Compressor = c
				res, err := FromDir(context.Background(), benchData.dir, io.Discard, opts)
				if err != nil {
					b.Fatal(err)
				}
				blobBytes = res.Blobs[0].Size
				os.RemoveAll(opts.BlobDir)
			}
			b.ReportMetric(float64(blobBytes)/float64(benchData.dirSize), "blob/src")
		})
	}
}
