package nydusimage

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// A layer digest, as nydus-snapshotter names a tarfs blob: not the sha256
// of the tar.
const testBlobID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// testTar is a tar with directories, big and small files, a symlink, a
// hard link, a PAX record and a long name, followed by trailing zeros
// as tar(1) pads archives to a record.
func testTar(t testing.TB) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	mt := time.Unix(1700000000, 0)
	add := func(h *tar.Header, data []byte) {
		h.ModTime = mt
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(data))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 200000) // 3.2 MB: several 1 MiB chunks
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/hostname", Mode: 0o644}, []byte("judge\n"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "big", Mode: 0o600, Uid: 7, Gid: 8,
		PAXRecords: map[string]string{"SCHILY.xattr.user.k": "v"}}, big)
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/link", Linkname: "hostname", Mode: 0o777}, nil)
	add(&tar.Header{Typeflag: tar.TypeLink, Name: "etc/hard", Linkname: "etc/hostname"}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "deep/" + strings.Repeat("n", 150), Mode: 0o644}, []byte("long name"))
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	b.Write(make([]byte, 10240-b.Len()%10240)) // tar(1)'s record padding
	return b.Bytes()
}

// fromTarFile is what build.FromTar makes of the same tar as a file.
func fromTarFile(t *testing.T, data []byte) []byte {
	dir := t.TempDir()
	p := filepath.Join(dir, "layer.tar")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	opts := build.DefaultOptions(filepath.Join(dir, "blobs"))
	opts.BlobID = testBlobID
	var boot bytes.Buffer
	if _, err := build.FromTar(context.Background(), f, &boot, opts); err != nil {
		t.Fatal(err)
	}
	return boot.Bytes()
}

// countingReader is a non-seekable stream that counts what was read.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// From a stream, CreateTarfs writes the bootstrap build.FromTar writes from
// the file, reads the stream to its end (past the end-of-archive marker:
// a writer teeing it must not be cut short), and leaves nothing behind in
// the temporary directory.
func TestCreateTarfsStreamEqualsFile(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	data := testTar(t)
	want := fromTarFile(t, data)

	boot := filepath.Join(t.TempDir(), "layer.boot")
	in := &countingReader{r: bytes.NewReader(data)}
	res, err := CreateTarfs(context.Background(), struct{ io.Reader }{in}, boot, testBlobID)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(boot)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("bootstrap from the stream differs from build.FromTar's (%d vs %d bytes)", len(got), len(want))
	}
	if in.n != len(data) {
		t.Errorf("read %d of the stream's %d bytes", in.n, len(data))
	}
	if b := res.Blobs[0]; b.ID != testBlobID || b.Size != int64(len(data)) || b.Path != "" {
		t.Errorf("blob %+v, want id %s, %d bytes, no path", b, testBlobID, len(data))
	}
	if left, _ := os.ReadDir(tmp); len(left) != 0 {
		t.Errorf("%d entries left in TMPDIR, first %s", len(left), left[0].Name())
	}
	img, err := rafs.Open(boot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if len(img.Blobs) != 1 {
		t.Fatalf("%d blobs in the table, want 1", len(img.Blobs))
	}
	if e := img.Blobs[0]; e.ID() != testBlobID || e.UncompressedSize != uint64(len(data)) {
		t.Errorf("blob table: %s of %d bytes, want %s of %d", e.ID(), e.UncompressedSize, testBlobID, len(data))
	}
}

// A stream that is no tar, or a tar cut short, gives an error and no
// bootstrap.
func TestCreateTarfsBadStreams(t *testing.T) {
	data := testTar(t)
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"not a tar", bytes.Repeat([]byte("x"), 4096), "not a tar stream"},
		{"truncated in file data", data[:len(data)/2], "unexpected EOF"},
		{"empty", nil, ""},
	} {
		boot := filepath.Join(t.TempDir(), "layer.boot")
		_, err := CreateTarfs(context.Background(), bytes.NewReader(tc.in), boot, testBlobID)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
		if _, serr := os.Stat(boot); serr == nil {
			t.Errorf("%s: a bootstrap was written", tc.name)
		}
		if left, _ := os.ReadDir(filepath.Dir(boot)); len(left) != 0 {
			t.Errorf("%s: %s left beside the bootstrap", tc.name, left[0].Name())
		}
	}
}

// A blob id that is not 64 hex digits is refused, naming it.
func TestCreateTarfsBadBlobID(t *testing.T) {
	boot := filepath.Join(t.TempDir(), "layer.boot")
	_, err := CreateTarfs(context.Background(), bytes.NewReader(testTar(t)), boot, "layer-1")
	if err == nil || !strings.Contains(err.Error(), `"layer-1"`) {
		t.Errorf("blob id layer-1: %v", err)
	}
}
