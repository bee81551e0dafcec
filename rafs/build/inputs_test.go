package build

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// Inputs other tools hand to the builder: compressed tars, and sources
// that hold the build's own outputs.

func gzipBytes(t *testing.T, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func zstdBytes(t *testing.T, b []byte) []byte {
	t.Helper()
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer zw.Close()
	return zw.EncodeAll(b, nil)
}

// blobDirNames lists a blob directory, temporary files included.
func blobDirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestFromTarCompressed: a gzip or zstd tar builds the image of the tar
// inside it, byte for byte: the blob is the uncompressed tar, named by its
// sha256, and the bootstrap is the one the plain tar gives.
func TestFromTarCompressed(t *testing.T) {
	ctx := context.Background()
	tb := makeTar(t, dirEnt("etc/", 0o755), reg("etc/hostname", "box\n"), reg("big", strings.Repeat("x", 70000)))
	sum := sha256.Sum256(tb)
	id := hex.EncodeToString(sum[:])
	var plain bytes.Buffer
	if _, err := FromTar(ctx, bytes.NewReader(tb), &plain, DefaultOptions(t.TempDir())); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data []byte
	}{{"gzip", gzipBytes(t, tb)}, {"zstd", zstdBytes(t, tb)}} {
		t.Run(tc.name, func(t *testing.T) {
			// From a file, as create gives it: the file must not be
			// hard-linked or reflinked as the blob.
			src := filepath.Join(t.TempDir(), "layer.tar."+tc.name)
			if err := os.WriteFile(src, tc.data, 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(src)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			blobDir := filepath.Join(t.TempDir(), "blobs")
			var boot bytes.Buffer
			res, err := FromTar(ctx, f, &boot, DefaultOptions(blobDir))
			if err != nil {
				t.Fatalf("FromTar(%s): %v", tc.name, err)
			}
			if !bytes.Equal(boot.Bytes(), plain.Bytes()) {
				t.Error("bootstrap differs from the plain tar's")
			}
			b := res.Blobs[0]
			if b.ID != id || b.Size != int64(len(tb)) || b.Placed != "decompressed "+tc.name {
				t.Errorf("blob %s, %d bytes, placed %q; want %s, %d bytes, decompressed %s", b.ID, b.Size, b.Placed, id, len(tb), tc.name)
			}
			if got, err := os.ReadFile(b.Path); err != nil || !bytes.Equal(got, tb) {
				t.Errorf("blob %s is not the uncompressed tar (%v)", b.Path, err)
			}
			if names := blobDirNames(t, blobDir); len(names) != 1 || names[0] != id {
				t.Errorf("blob dir holds %q, want only %s", names, id)
			}
			// Naming the blob: its diff_id is accepted, the digest of
			// the compressed bytes is not.
			opts := DefaultOptions(t.TempDir())
			opts.BlobID = "sha256:" + id
			if _, err := FromTar(ctx, bytes.NewReader(tc.data), io.Discard, opts); err != nil {
				t.Errorf("blob id = diff_id: %v", err)
			}
			zsum := sha256.Sum256(tc.data)
			opts = DefaultOptions(t.TempDir())
			opts.BlobID = hex.EncodeToString(zsum[:])
			_, err = FromTar(ctx, bytes.NewReader(tc.data), io.Discard, opts)
			if err == nil || !strings.Contains(err.Error(), "not the sha256 of the decompressed tar") {
				t.Errorf("blob id = compressed digest: %v", err)
			}
			if names := blobDirNames(t, opts.BlobDir); len(names) != 0 {
				t.Errorf("a refused build left %q in the blob dir", names)
			}
		})
	}
}

// TestFromTarCompressedBroken: a truncated or corrupt compressed tar is an
// error naming the compression, and leaves no partial blob behind.
func TestFromTarCompressedBroken(t *testing.T) {
	tb := makeTar(t, reg("a", strings.Repeat("a", 10000)))
	gz, zs := gzipBytes(t, tb), zstdBytes(t, tb)
	for name, data := range map[string][]byte{
		"truncated gzip":  gz[:len(gz)/2],
		"truncated zstd":  zs[:len(zs)/2],
		"gzip magic only": {0x1f, 0x8b},
		"zstd magic only": {0x28, 0xb5, 0x2f, 0xfd},
		"gzip of garbage": gzipBytes(t, bytes.Repeat([]byte{1}, 3000)),
	} {
		blobDir := t.TempDir()
		_, err := FromTar(context.Background(), bytes.NewReader(data), io.Discard, DefaultOptions(blobDir))
		if err == nil {
			t.Errorf("%s: built", name)
			continue
		}
		if !strings.Contains(err.Error(), "gzip") && !strings.Contains(err.Error(), "zstd") && !strings.Contains(err.Error(), "tar") {
			t.Errorf("%s: error %q says nothing of what is wrong", name, err)
		}
		if names := blobDirNames(t, blobDir); len(names) != 0 {
			t.Errorf("%s: left %q in the blob dir (%v)", name, names, err)
		}
	}
}

// TestFromDirExcludesOutputs: `create -B DIR/image.boot -D DIR/blobs DIR`
// writes its outputs into its own source. The blob directory (with a blob
// of an earlier build in it), the bootstrap of an earlier build and the
// temporary bootstrap being written stay out of the image, however they
// are spelled; everything else is in it.
func TestFromDirExcludesOutputs(t *testing.T) {
	src := t.TempDir()
	for p, data := range map[string]string{
		"etc/hostname":    "box\n",
		"image.boot":      "an earlier build's bootstrap",
		"blobs/0123abcd":  "an earlier build's blob",
		"sub/image.boot":  "not an output: same name elsewhere",
		"sub/blobs/kept":  "not an output either",
		".image.boot.tmp": "the bootstrap being written",
	} {
		if err := os.MkdirAll(filepath.Join(src, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, p), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The bootstrap is named through a symlink to the source.
	link := filepath.Join(t.TempDir(), "srclink")
	if err := os.Symlink(src, link); err != nil {
		t.Fatal(err)
	}
	opts := DefaultOptions(filepath.Join(src, "blobs") + "/")
	opts.Exclude = []string{filepath.Join(link, "image.boot"), filepath.Join(src, ".image.boot.tmp"), filepath.Join(src, "not-yet")}
	bootPath := filepath.Join(t.TempDir(), "image.boot")
	boot, err := os.Create(bootPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromDir(context.Background(), src, boot, opts); err != nil {
		t.Fatal(err)
	}
	if err := boot.Close(); err != nil {
		t.Fatal(err)
	}
	img, err := rafs.Open(bootPath)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var got []string
	if err := img.Walk(func(p string, e *rafs.Entry) error {
		got = append(got, p)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	want := []string{"/", "/etc", "/etc/hostname", "/sub", "/sub/blobs", "/sub/blobs/kept", "/sub/image.boot"}
	if !slices.Equal(got, want) {
		t.Errorf("image holds %q, want %q", got, want)
	}

	// A source that is itself an output is refused.
	opts = DefaultOptions(src)
	if _, err := FromDir(context.Background(), src, io.Discard, opts); err == nil || !strings.Contains(err.Error(), "is one of the build's outputs") {
		t.Errorf("source = blob dir: %v", err)
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// TestFailedBootstrapLeavesNoBlob: when the bootstrap cannot be written,
// the blob (a tar copied, linked or decompressed, or a directory's chunks)
// is not left in the blob directory either.
func TestFailedBootstrapLeavesNoBlob(t *testing.T) {
	tb := makeTar(t, reg("a", strings.Repeat("a", 10000)))
	file := filepath.Join(t.TempDir(), "layer.tar")
	if err := os.WriteFile(file, tb, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for name, r := range map[string]io.ReaderAt{
		"file":   f,
		"memory": bytes.NewReader(tb),
		"gzip":   bytes.NewReader(gzipBytes(t, tb)),
	} {
		blobDir := t.TempDir()
		_, err := FromTar(context.Background(), r, failingWriter{}, DefaultOptions(blobDir))
		if err == nil || !strings.Contains(err.Error(), "disk full") {
			t.Errorf("%s: %v, want the writer's error", name, err)
		}
		if names := blobDirNames(t, blobDir); len(names) != 0 {
			t.Errorf("%s: a failed build left %q in the blob dir", name, names)
		}
	}
	blobDir := t.TempDir()
	_, err = FromDir(context.Background(), filepath.Dir(file), failingWriter{}, DefaultOptions(blobDir))
	if err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("dir: %v, want the writer's error", err)
	}
	if names := blobDirNames(t, blobDir); len(names) != 0 {
		t.Errorf("dir: a failed build left %q in the blob dir", names)
	}
}
