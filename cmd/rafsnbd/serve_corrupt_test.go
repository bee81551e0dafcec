package main

import (
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// A blob changed on disk after the image was built: serve answers EIO for
// reads of the changed chunk and the right bytes everywhere else, with and
// without a cache directory (qemu-io is the client).
func TestServeChangedBlob(t *testing.T) {
	qemuIO := testutil.RequireTool(t, "qemu-io")
	bin := buildBinary(t)
	w := t.TempDir()
	src := filepath.Join(w, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b"} {
		data := make([]byte, 128<<10) // random: stored raw, two 64 KiB chunks each
		rand.Read(data)
		if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	boot, blobs := filepath.Join(w, "i.boot"), filepath.Join(w, "blobs")
	run(t, bin, "-q", "create", "-B", boot, "-D", blobs, "--chunk-size", "64K", src)
	img, err := rafs.Open(boot)
	if err != nil {
		t.Fatal(err)
	}
	blob := img.Blobs[0]
	base := int64(img.DeviceSlots[0].MappedBlkAddr) * int64(img.BlockSize)
	img.Close()
	f, err := os.OpenFile(filepath.Join(blobs, blob.ID()), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("CHANGED!"), 1000); err != nil { // inside the first stored chunk
		t.Fatal(err)
	}
	f.Close()

	for _, cache := range []bool{false, true} {
		args := []string{"-B", boot, "-D", blobs}
		if cache {
			args = append(args, "--cache-dir", filepath.Join(w, "cache"))
		}
		uri := startServe(t, bin, args...)
		failed := 0
		for i := int64(0); i < 4; i++ { // the four chunks
			off := strconv.FormatInt(base+i*64<<10, 10)
			out, _ := exec.Command(qemuIO, "-r", "-f", "raw", "-c", "read "+off+" 4096", uri).CombinedOutput()
			switch {
			case strings.Contains(string(out), "Input/output error"):
				failed++
			case !strings.Contains(string(out), "read 4096/4096 bytes"):
				t.Errorf("cache %v: read at %s: %s", cache, off, out)
			}
		}
		if out, _ := exec.Command(qemuIO, "-r", "-f", "raw", "-c", "read 0 4096", uri).CombinedOutput(); !strings.Contains(string(out), "read 4096/4096 bytes") {
			t.Errorf("cache %v: superblock read: %s", cache, out)
		}
		if failed != 1 {
			t.Errorf("cache %v: %d of the 4 chunk reads failed, want exactly the changed one", cache, failed)
		}
	}
}
