package build

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// A file over 4 GiB, both ways, checked through the kernel at markers on
// each side of the 4 GiB line. The files are sparse, so this costs reading
// zeros, not disk space.

const largeSize = 5<<30 + 12345

var largeMarkers = map[int64]string{
	0:             "start",
	4<<30 - 3:     "across 4 GiB",
	4<<30 + 77777: "beyond 4 GiB",
	largeSize - 3: "end",
}

func TestKernelLargeFileDir(t *testing.T) {
	testutil.SkipShort(t)
	testutil.RequireRoot(t)
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "large"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(largeSize); err != nil {
		t.Fatal(err)
	}
	for off, m := range largeMarkers {
		if _, err := f.WriteAt([]byte(m), off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	opts := DefaultOptions(t.TempDir())
	boot, res := buildDir(t, src, opts)
	t.Logf("blob: %d bytes, %d distinct chunks", res.Blobs[0].Size, res.Blobs[0].Chunks)
	mnt := testutil.MountErofs(t, flatImage(t, boot, opts.BlobDir), "loop")
	checkLarge(t, filepath.Join(mnt, "large"))
}

func TestKernelLargeFileTarfs(t *testing.T) {
	testutil.SkipShort(t)
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "losetup")
	// Header by archive/tar, data as a hole with the markers written in.
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	if err := tw.WriteHeader(&tar.Header{Name: "large", Typeflag: tar.TypeReg, Mode: 0o644, Size: largeSize, Format: tar.FormatPAX}); err != nil {
		t.Fatal(err)
	}
	tarPath := filepath.Join(t.TempDir(), "large.tar")
	f, err := os.Create(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	dataOff := int64(hdr.Len())
	if _, err := f.Write(hdr.Bytes()); err != nil {
		t.Fatal(err)
	}
	for off, m := range largeMarkers {
		if _, err := f.WriteAt([]byte(m), dataOff+off); err != nil {
			t.Fatal(err)
		}
	}
	end := dataOff + (largeSize+511)/512*512
	if _, err := f.WriteAt(make([]byte, 1024), end); err != nil { // end-of-archive
		t.Fatal(err)
	}
	f.Close()

	opts := DefaultOptions(t.TempDir())
	opts.BlobID = "sha256:" + strings.Repeat("5a", 32) // spare hashing 5 GiB of zeros
	boot, res := buildTarFile(t, tarPath, opts)
	if res.Blobs[0].ID != strings.Repeat("5a", 32) {
		t.Fatalf("blob id %s", res.Blobs[0].ID)
	}
	dev := testutil.Losetup(t, res.Blobs[0].Path)
	mnt := testutil.MountErofs(t, boot, "loop", "device="+dev)
	checkLarge(t, filepath.Join(mnt, "large"))
}

func checkLarge(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() != largeSize {
		t.Fatalf("size %v, %v; want %d", st.Size(), err, int64(largeSize))
	}
	for off, m := range largeMarkers {
		// The marker and a zero byte on each side (where the file has one).
		lo, hi := max(off-1, 0), min(off+int64(len(m))+1, largeSize)
		got := make([]byte, hi-lo)
		if n, err := f.ReadAt(got, lo); n != len(got) {
			t.Fatalf("read [%d, %d): %d bytes, %v", lo, hi, n, err)
		}
		want := make([]byte, hi-lo)
		copy(want[off-lo:], m)
		if !bytes.Equal(got, want) {
			t.Errorf("at %d: %q, want %q", off, got, want)
		}
	}
}
