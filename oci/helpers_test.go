package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
)

// ---------------------------------------------------------------------------
// Layers made by hand

var testTime = time.Unix(1700000000, 0)

type tarEnt struct {
	hdr  tar.Header
	data []byte
}

func tFile(name, data string) tarEnt {
	return tarEnt{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data)), ModTime: testTime, Format: tar.FormatPAX}, data: []byte(data)}
}

func tDir(name string, mode int64) tarEnt {
	return tarEnt{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode, ModTime: testTime, Format: tar.FormatPAX}}
}

func tLink(name, target string) tarEnt {
	return tarEnt{hdr: tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target, ModTime: testTime, Format: tar.FormatPAX}}
}

func tSymlink(name, target string) tarEnt {
	return tarEnt{hdr: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777, ModTime: testTime, Format: tar.FormatPAX}}
}

func withXattr(e tarEnt, k, v string) tarEnt {
	if e.hdr.PAXRecords == nil {
		e.hdr.PAXRecords = map[string]string{}
	}
	e.hdr.PAXRecords["SCHILY.xattr."+k] = v
	return e
}

func withOwner(e tarEnt, uid, gid int) tarEnt {
	e.hdr.Uid, e.hdr.Gid = uid, gid
	return e
}

func withMode(e tarEnt, mode int64) tarEnt {
	e.hdr.Mode = mode
	return e
}

func makeTar(t testing.TB, ents ...tarEnt) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range ents {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar %s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// memLayer is a v1.Layer from bytes whose digests are what the test says,
// so that tests can make layers that lie.
type memLayer struct {
	blob, tar      []byte
	mt             types.MediaType
	digest, diffID v1.Hash
}

func (l *memLayer) Digest() (v1.Hash, error) { return l.digest, nil }
func (l *memLayer) DiffID() (v1.Hash, error) { return l.diffID, nil }
func (l *memLayer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.blob)), nil
}
func (l *memLayer) Uncompressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.tar)), nil
}
func (l *memLayer) Size() (int64, error)                { return int64(len(l.blob)), nil }
func (l *memLayer) MediaType() (types.MediaType, error) { return l.mt, nil }

// newLayer compresses a tar: "gzip", "zstd" or "none".
func newLayer(t testing.TB, tarBytes []byte, compression string) *memLayer {
	t.Helper()
	l := &memLayer{tar: tarBytes, diffID: sha256Hash(tarBytes)}
	var b bytes.Buffer
	switch compression {
	case "gzip":
		zw := gzip.NewWriter(&b)
		zw.Write(tarBytes)
		zw.Close()
		l.mt = types.OCILayer
	case "docker-gzip":
		zw := gzip.NewWriter(&b)
		zw.Write(tarBytes)
		zw.Close()
		l.mt = types.DockerLayer
	case "zstd":
		zw, err := zstd.NewWriter(&b)
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(tarBytes)
		zw.Close()
		l.mt = types.OCILayerZStd
	case "none":
		b.Write(tarBytes)
		l.mt = types.OCIUncompressedLayer
	default:
		t.Fatalf("compression %q", compression)
	}
	l.blob = b.Bytes()
	l.digest = sha256Hash(l.blob)
	return l
}

// newImage makes an OCI image (linux, this architecture) of the layers.
func newImage(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		mt, _ := l.MediaType()
		if img, err = mutate.Append(img, mutate.Addendum{Layer: l, MediaType: mt}); err != nil {
			t.Fatal(err)
		}
	}
	return img
}

// writeLayout writes img into a new OCI layout under dir, tagged tag.
func writeLayout(t testing.TB, dir, tag string, img v1.Image) string {
	t.Helper()
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{refNameAnnotation: tag})); err != nil {
		t.Fatal(err)
	}
	return dir
}

func digestOf(t testing.TB, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// ---------------------------------------------------------------------------
// Registry (recipe E): Debian's docker-registry via internal/testregistry

func pushImage(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// ---------------------------------------------------------------------------
// Judges: umoci's extraction, the kernel's mount

// umociUnpack extracts LAYOUT:TAG with umoci and returns the rootfs.
func umociUnpack(t testing.TB, layoutDir, tag string) string {
	t.Helper()
	testutil.RequireRoot(t)
	bin := testutil.RequireTool(t, "umoci")
	bundle := filepath.Join(t.TempDir(), "bundle")
	out, err := exec.Command(bin, "unpack", "--image", layoutDir+":"+tag, bundle).CombinedOutput()
	if err != nil {
		t.Fatalf("umoci unpack %s:%s: %v\n%s", layoutDir, tag, err, out)
	}
	return filepath.Join(bundle, "rootfs")
}

// mountDisk loop-mounts an EROFS disk read-only until the test ends. With
// a verity tree appended, sizelimit keeps it out of the filesystem's view.
func mountDisk(t testing.TB, disk string, sizeLimit int64) string {
	t.Helper()
	opts := []string{"loop"}
	if sizeLimit > 0 {
		opts = append(opts, fmt.Sprintf("sizelimit=%d", sizeLimit))
	}
	return testutil.MountErofs(t, disk, opts...)
}

// compareTrees fails the test with every difference between the reference
// and the mounted tree, except those skip drops.
func compareTrees(t testing.TB, want, got string, opts treecmp.Options, skip func(path string) bool) {
	t.Helper()
	w, err := treecmp.Scan(want, opts)
	if err != nil {
		t.Fatal(err)
	}
	g, err := treecmp.Scan(got, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []map[string]*treecmp.Entry{w, g} {
		for p, e := range m {
			if skip != nil && skip(p) {
				delete(m, p)
			}
			// umoci does not restore a directory's mtime after it has
			// created or deleted entries in it, nor give directories it
			// makes up for a missing parent a time of their own: its
			// directory mtimes are extraction times.
			if e.Type == "dir" {
				e.MtimeNsec = 0
			}
		}
	}
	if len(w) == 0 {
		t.Fatal("empty reference tree")
	}
	if diffs := treecmp.Diff(w, g, opts); len(diffs) > 0 {
		t.Errorf("%d differences between %s (reference) and %s:\n%s", len(diffs), want, got, treecmp.Summary(diffs, 50))
	}
}

// ---------------------------------------------------------------------------
// The CLI, for tests that kill it

var (
	cliOnce sync.Once
	cliPath string
	cliErr  error
)

// rafsnbdBinary builds cmd/rafsnbd once per test binary run.
func rafsnbdBinary(t testing.TB) string {
	t.Helper()
	cliOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rafsnbd-oci-test-")
		if err != nil {
			cliErr = err
			return
		}
		cliPath = filepath.Join(dir, "rafsnbd")
		out, err := exec.Command("go", "build", "-o", cliPath, "../cmd/rafsnbd").CombinedOutput()
		if err != nil {
			cliErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if cliErr != nil {
		t.Fatal(cliErr)
	}
	return cliPath
}

// ---------------------------------------------------------------------------

func convertT(t testing.TB, ref string, opts Options) *Result {
	t.Helper()
	res, err := Convert(context.Background(), ref, opts)
	if err != nil {
		t.Fatalf("convert %s: %v", ref, err)
	}
	return res
}

// isWhiteout reports whether a scanned path is a whiteout entry.
func isWhiteout(p string) bool { return strings.HasPrefix(filepath.Base(p), ".wh.") }

func execOutput(bin string, args ...string) ([]byte, error) {
	return exec.Command(bin, args...).CombinedOutput()
}

func itoa(v uint64) string { return strconv.FormatUint(v, 10) }

// mutateIndex makes an OCI index of one image per platform.
func mutateIndex(t testing.TB, images map[string]v1.Image) v1.ImageIndex {
	t.Helper()
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for plat, img := range images {
		p, err := v1.ParsePlatform(plat)
		if err != nil {
			t.Fatal(err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: p}})
	}
	return idx
}

func writeLayoutIndex(t testing.TB, dir, tag string, idx v1.ImageIndex) {
	t.Helper()
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.AppendIndex(idx, layout.WithAnnotations(map[string]string{refNameAnnotation: tag})); err != nil {
		t.Fatal(err)
	}
}
