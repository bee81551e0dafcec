package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// Inputs of create that other tools hand over: compressed tars, sources
// holding create's own outputs, and builds that fail.

func inputsTar(t *testing.T) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for name, data := range map[string]string{"etc/hostname": "box\n", "big": strings.Repeat("big ", 30000)} {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data))}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestCreateCompressedTar: `create` takes a .tar.gz or .tar.zst as it
// takes the tar inside; the blob is that tar.
func TestCreateCompressedTar(t *testing.T) {
	tb := inputsTar(t)
	sum := sha256.Sum256(tb)
	id := hex.EncodeToString(sum[:])
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tb)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	zs := enc.EncodeAll(tb, nil)
	enc.Close()
	for name, data := range map[string][]byte{"layer.tar.gz": gz.Bytes(), "layer.tar.zst": zs} {
		w := t.TempDir()
		src := filepath.Join(w, name)
		if err := os.WriteFile(src, data, 0o644); err != nil {
			t.Fatal(err)
		}
		boot, blobs := filepath.Join(w, "layer.boot"), filepath.Join(w, "blobs")
		out, err := runCmd(t, "create", "-B", boot, "-D", blobs, src)
		if err != nil {
			t.Fatalf("create %s: %v\n%s", name, err, out)
		}
		if !strings.Contains(out, "blob "+id+": ") || !strings.Contains(out, "decompressed") {
			t.Errorf("create %s printed:\n%s\nwant blob %s, decompressed", name, out, id)
		}
		img, err := rafs.Open(boot)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := os.ReadFile(filepath.Join(blobs, id))
		if err != nil || !bytes.Equal(raw, tb) {
			t.Errorf("%s: blob %s is not the uncompressed tar (%v)", name, id, err)
		}
		got, err := fs.ReadFile(img.FS([]io.ReaderAt{bytes.NewReader(raw)}), "etc/hostname")
		if err != nil || string(got) != "box\n" {
			t.Errorf("%s: etc/hostname = %q, %v", name, got, err)
		}
		img.Close()
	}
}

// TestCreateFailureLeavesNothing: a create that fails removes the blob
// directory it made (and its missing parents), blobs and all; in a blob
// directory that was there it leaves no temporary file.
func TestCreateFailureLeavesNothing(t *testing.T) {
	w := t.TempDir()
	broken := filepath.Join(w, "broken.tar.gz")
	if err := os.WriteFile(broken, []byte{0x1f, 0x8b, 8, 0, 0, 0}, 0o644); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(w, "good.tar")
	if err := os.WriteFile(good, inputsTar(t), 0o644); err != nil {
		t.Fatal(err)
	}
	bootDir := filepath.Join(w, "boot-is-a-dir")
	if err := os.Mkdir(bootDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, boot, src, msg string }{
		// The build fails.
		{"broken gzip", filepath.Join(w, "x.boot"), broken, broken},
		// The bootstrap path is refused after the blob dir was made.
		{"bootstrap is a directory", bootDir, good, bootDir},
	} {
		blobs := filepath.Join(w, "new", "blobs")
		out, err := runCmd(t, "create", "-B", tc.boot, "-D", blobs, tc.src)
		if err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v, want an error naming %s\n%s", tc.name, err, tc.msg, out)
		}
		if _, err := os.Lstat(filepath.Join(w, "new")); !os.IsNotExist(err) {
			t.Errorf("%s: the blob dir's parent create made is still there (%v)", tc.name, err)
		}
		// An existing blob dir stays, with nothing new in it.
		blobs = filepath.Join(w, "blobs")
		if err := os.MkdirAll(blobs, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := runCmd(t, "create", "-B", filepath.Join(w, "y.boot"), "-D", blobs, broken); err == nil {
			t.Errorf("%s: create from a broken gzip succeeded", tc.name)
		}
		if ents, err := os.ReadDir(blobs); err != nil || len(ents) != 0 {
			t.Errorf("%s: existing blob dir holds %d entries after a failed create (%v)", tc.name, len(ents), err)
		}
	}
	if ents, _ := os.ReadDir(w); len(ents) != 4 { // broken, good, bootDir, blobs
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("work dir holds %q after failed creates", names)
	}
}

// TestCreateOutputsInsideSource: `create -B DIR/image.boot -D DIR/blobs
// DIR`, twice: the image holds the source minus the outputs (its own
// temporary bootstrap, the blob dir, the earlier bootstrap).
func TestCreateOutputsInsideSource(t *testing.T) {
	src := t.TempDir()
	files := map[string]string{"a": "alpha", "sub/b": strings.Repeat("beta ", 20000), "sub/blobs": "not the blob dir"}
	for name, data := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	boot, blobs := filepath.Join(src, "image.boot"), filepath.Join(src, "blobs")
	for run := range 2 {
		out, err := runCmd(t, "create", "-B", boot, "-D", blobs, src)
		if err != nil {
			t.Fatalf("run %d: %v\n%s", run, err, out)
		}
		img, err := rafs.Open(boot)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		err = img.Walk(func(p string, e *rafs.Entry) error {
			got = append(got, p)
			if e.IsRegular() && files[strings.TrimPrefix(p, "/")] == "" {
				t.Errorf("run %d: image holds file %s, not one of the source's", run, p)
			}
			return nil
		})
		img.Close()
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"/", "/a", "/sub", "/sub/b", "/sub/blobs"}; !slices.Equal(got, want) {
			t.Errorf("run %d: image holds %q, want %q", run, got, want)
		}
	}
}
