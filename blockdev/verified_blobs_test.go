package blockdev

import (
	"archive/tar"
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// blobSources are the ways an image's blobs are read: straight from the
// directory (-D without --cache-dir), through a disk cache, through a
// memory-only cache. Every one must verify every chunk.
func blobSources(t *testing.T, blobDir string) map[string]func() BlobOpener {
	return map[string]func() BlobOpener{
		"local": func() BlobOpener { return LocalBlobs{Dir: blobDir} },
		"disk-cache": func() BlobOpener {
			c, err := blobcache.Open(t.TempDir(), nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return CachedBlobs{Cache: c, Store: localfs.New(blobDir)}
		},
		"memory-cache": func() BlobOpener {
			c, err := blobcache.OpenMemory(&blobcache.Options{MemoryLimit: 64 << 10})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return CachedBlobs{Cache: c, Store: localfs.New(blobDir)}
		},
	}
}

// buildDirImage builds a directory image of several chunks with comp and
// returns its bootstrap path and blob file.
func buildDirImage(t *testing.T, comp rafs.Compressor) (boot, blobPath string) {
	t.Helper()
	src, out := t.TempDir(), t.TempDir()
	rng := rand.New(rand.NewPCG(uint64(comp), 7))
	text := bytes.Repeat([]byte("verified chunks only. "), 12000)
	random := make([]byte, 200<<10)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(filepath.Join(src, "text"), text, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "random"), random, 0o644); err != nil {
		t.Fatal(err)
	}
	opts := build.DefaultOptions(out)
	opts.Compressor = comp
	opts.ChunkSize = 64 << 10
	boot = filepath.Join(out, "image.boot")
	f, err := os.Create(boot)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := build.FromDir(context.Background(), src, f, opts)
	if err != nil {
		t.Fatal(err)
	}
	return boot, res.Blobs[0].Path
}

// deviceRanges returns the device ranges of the first and the last chunk
// of blob 0, by its chunk-info array.
func deviceRanges(t *testing.T, img *Image, blobPath string) (first, last [2]int64, stored [2]int64) {
	t.Helper()
	f, err := os.Open(blobPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunks, err := rafs.ReadBlobChunks(f, &img.Rafs.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	if len(chunks) < 3 {
		t.Fatalf("%d chunks, want at least 3", len(chunks))
	}
	base := int64(img.Rafs.DeviceSlots[0].MappedBlkAddr) * int64(img.BlockSize())
	c0, cn := chunks[0], chunks[len(chunks)-1]
	first = [2]int64{base + int64(c0.UncompressedOffset), int64(c0.UncompressedSize)}
	last = [2]int64{base + int64(cn.UncompressedOffset), int64(cn.UncompressedSize)}
	return first, last, [2]int64{int64(c0.CompressedOffset), int64(c0.CompressedSize)}
}

// An 8-byte change inside one chunk's stored bytes fails the export and
// the reads of that chunk, with and without a cache, for every compressor
// the builder supports; the other chunks still read correctly. (Before
// blobcache served -D reads, a stored-raw or still-decodable chunk was
// exported with exit 0.)
func TestCorruptDirBlobFailsReadsAndExport(t *testing.T) {
	for _, comp := range []rafs.Compressor{rafs.CompressNone, rafs.CompressLZ4Block, rafs.CompressGzip, rafs.CompressZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			boot, blobPath := buildDirImage(t, comp)
			blobDir := filepath.Dir(blobPath)
			good, err := Open(context.Background(), boot, LocalBlobs{Dir: blobDir})
			if err != nil {
				t.Fatal(err)
			}
			first, last, stored := deviceRanges(t, good, blobPath)
			want := make([]byte, last[1])
			if _, err := good.ReadAt(want, last[0]); err != nil {
				t.Fatal(err)
			}
			good.Close()

			data, err := os.ReadFile(blobPath)
			if err != nil {
				t.Fatal(err)
			}
			mid := stored[0] + stored[1]/2
			for i := mid; i < mid+8; i++ {
				data[i] ^= 0x5A
			}
			if err := os.WriteFile(blobPath, data, 0o644); err != nil {
				t.Fatal(err)
			}

			for name, source := range blobSources(t, blobDir) {
				t.Run(name, func(t *testing.T) {
					img, err := Open(context.Background(), boot, source())
					if err != nil {
						t.Fatal(err)
					}
					defer img.Close()
					p := make([]byte, first[1])
					if _, err := img.ReadAt(p, first[0]); err == nil {
						t.Error("read of the changed chunk succeeded")
					}
					got := make([]byte, last[1])
					if _, err := img.ReadAt(got, last[0]); err != nil || !bytes.Equal(got, want) {
						t.Errorf("read of an intact chunk: %v (bytes equal: %v)", err, bytes.Equal(got, want))
					}
					if _, err := Export(context.Background(), img, filepath.Join(t.TempDir(), "disk"), ExportOptions{}); err == nil {
						t.Error("export of an image with a changed blob succeeded")
					}
				})
			}
		})
	}
}

// A tarfs blob has no chunk digests: what is checked is its size, at open
// (see blobcache.checkStoredSize). Appended or missing bytes fail the
// open, so nothing is exported.
func TestTarfsBlobSizeChecked(t *testing.T) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	body := bytes.Repeat([]byte("tar file data "), 10000)
	if err := tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
		t.Fatal(err)
	}
	tw.Write(body)
	tw.Close()
	out := t.TempDir()
	boot := filepath.Join(out, "layer.boot")
	f, err := os.Create(boot)
	if err != nil {
		t.Fatal(err)
	}
	res, err := build.FromTar(context.Background(), bytes.NewReader(tb.Bytes()), f, build.DefaultOptions(out))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	blobPath := res.Blobs[0].Path
	for name, source := range blobSources(t, out) {
		img, err := Open(context.Background(), boot, source())
		if err != nil {
			t.Fatalf("%s: intact tarfs blob: %v", name, err)
		}
		img.Close()
	}
	for _, change := range []struct {
		name string
		data []byte
	}{
		{"appended", append(bytes.Clone(tb.Bytes()), make([]byte, 512)...)},
		{"truncated", tb.Bytes()[:tb.Len()-512]},
	} {
		os.Remove(blobPath) // may be a hard link or reflink of the source
		if err := os.WriteFile(blobPath, change.data, 0o644); err != nil {
			t.Fatal(err)
		}
		for name, source := range blobSources(t, out) {
			img, err := Open(context.Background(), boot, source())
			if err == nil {
				img.Close()
				t.Errorf("%s, %s: open succeeded", change.name, name)
			} else if !strings.Contains(err.Error(), "bootstrap says") {
				t.Errorf("%s, %s: %v, want the size mismatch named", change.name, name, err)
			}
		}
	}
}

// Two images that share a blob, opened through one cache, open it once;
// it is closed when the last image is.
func TestImagesShareBlob(t *testing.T) {
	boot, blobPath := buildDirImage(t, rafs.CompressZstd)
	cache, err := blobcache.OpenMemory(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	blobs := CachedBlobs{Cache: cache, Store: localfs.New(filepath.Dir(blobPath))}
	a, err := Open(context.Background(), boot, blobs)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(context.Background(), boot, blobs)
	if err != nil {
		t.Fatal(err)
	}
	if st := cache.Stats(); st.Opens != 1 || st.OpenBlobs != 1 || st.Handles != 2 {
		t.Errorf("two images: %+v, want the blob opened once with two handles", st)
	}
	a.Close()
	p := make([]byte, 4096)
	if _, err := b.ReadAt(p, b.Size()-4096); err != nil {
		t.Errorf("second image after the first closed: %v", err)
	}
	if st := cache.Stats(); st.OpenBlobs != 1 || st.Handles != 1 {
		t.Errorf("after one image closed: %+v", st)
	}
	b.Close()
	if st := cache.Stats(); st.OpenBlobs != 0 || st.Handles != 0 || st.MemoryBytes != 0 {
		t.Errorf("after both closed: %+v, want nothing open", st)
	}
}
