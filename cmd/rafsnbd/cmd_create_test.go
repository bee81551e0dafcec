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
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// TestCreate builds a small tree as a directory image, as a tarfs image
// from a file and from stdin, and reads each back with the rafs reader.
func TestCreate(t *testing.T) {
	w := t.TempDir()
	src := filepath.Join(w, "src")
	files := map[string]string{"a.txt": "alpha", "sub/b.txt": strings.Repeat("beta ", 5000), "sub/empty": ""}
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	for name, data := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
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
	tarPath := filepath.Join(w, "layer.tar")
	if err := os.WriteFile(tarPath, tarBuf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	tarSum := sha256.Sum256(tarBuf.Bytes())

	check := func(t *testing.T, out, boot, blobs string, tarfs bool) {
		t.Helper()
		if !strings.HasPrefix(out, "bootstrap "+boot+": ") || !strings.Contains(out, "\nblob ") {
			t.Fatalf("output:\n%s", out)
		}
		img, err := rafs.Open(boot)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if img.IsTarfs() != tarfs || len(img.Blobs) != 1 {
			t.Fatalf("tarfs %v, %d blobs", img.IsTarfs(), len(img.Blobs))
		}
		id := img.Blobs[0].ID()
		if !strings.Contains(out, "blob "+id+": ") {
			t.Errorf("output does not name blob %s:\n%s", id, out)
		}
		raw, err := os.ReadFile(filepath.Join(blobs, id))
		if err != nil {
			t.Fatal(err)
		}
		if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != id {
			t.Errorf("blob %s is not named by its sha256", id)
		}
		if tarfs && id != hex.EncodeToString(tarSum[:]) {
			t.Errorf("tarfs blob id %s is not the tar's sha256", id)
		}
		if !tarfs {
			return // the dir blob's uncompressed space is blobcache's business
		}
		fsys := img.FS([]io.ReaderAt{bytes.NewReader(raw)})
		for name, want := range files {
			got, err := fs.ReadFile(fsys, name)
			if err != nil || string(got) != want {
				t.Errorf("%s: %q, %v", name, got, err)
			}
		}
	}

	t.Run("dir", func(t *testing.T) {
		boot, blobs := filepath.Join(w, "d.boot"), filepath.Join(w, "dblobs")
		out, err := runCmd(t, "create", "-B", boot, "-D", blobs, "--compressor", "lz4_block", "--chunk-size", "64K", src)
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		check(t, out, boot, blobs, false)
	})
	t.Run("tar", func(t *testing.T) {
		boot, blobs := filepath.Join(w, "t.boot"), filepath.Join(w, "tblobs")
		out, err := runCmd(t, "create", "-B", boot, "-D", blobs, tarPath)
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		check(t, out, boot, blobs, true)
	})
	t.Run("stdin", func(t *testing.T) {
		in, err := os.Open(tarPath)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		saved := os.Stdin
		os.Stdin = in
		defer func() { os.Stdin = saved }()
		boot, blobs := filepath.Join(w, "s.boot"), filepath.Join(w, "sblobs")
		out, err := runCmd(t, "create", "-B", boot, "-D", blobs, "-")
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		check(t, out, boot, blobs, true)
		ents, _ := os.ReadDir(blobs)
		if len(ents) != 1 {
			t.Errorf("blob dir holds %d files, want just the blob (the spool must go)", len(ents))
		}
	})
	for name, args := range map[string][]string{
		"tarfs of a dir":     {"--type", "tarfs", src},
		"dir of a tar":       {"--type", "dir", tarPath},
		"compressor + tarfs": {"--compressor", "gzip", tarPath},
		"blob id + dir":      {"--blob-id", strings.Repeat("a", 64), src},
		"two sources":        {src, tarPath},
		"bad chunk size":     {"--chunk-size", "3K", src},
	} {
		t.Run(name, func(t *testing.T) {
			out, err := runCmd(t, "create", append([]string{"-B", filepath.Join(w, "x.boot"), "-D", filepath.Join(w, "x")}, args...)...)
			if err == nil {
				t.Fatalf("accepted: %s", out)
			}
			t.Log(err)
			if _, serr := os.Stat(filepath.Join(w, "x.boot")); serr == nil {
				t.Error("a bootstrap was left behind")
			}
		})
	}
}
