package build

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// tarEntry is one entry of a tar made by a test.
type tarEntry struct {
	hdr  tar.Header
	data string
}

func reg(name, data string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data)), ModTime: time.Unix(1700000000, 0)}, data: data}
}
func dirEnt(name string, mode int64) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode, ModTime: time.Unix(1700000000, 0)}}
}
func symlinkEnt(name, target string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777, ModTime: time.Unix(1700000000, 0)}}
}
func hardlinkEnt(name, target string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target, ModTime: time.Unix(1700000000, 0)}}
}

func makeTar(t testing.TB, ents ...tarEntry) []byte {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range ents {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
		if _, err := io.WriteString(tw, e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// buildTarBytes builds a tarfs image from an in-memory tar and returns it
// as an fs.FS read through the package's reader, with the tar as the blob.
func buildTarBytes(t testing.TB, tarBytes []byte) (fs.FS, error) {
	t.Helper()
	var boot bytes.Buffer
	_, err := FromTar(context.Background(), bytes.NewReader(tarBytes), &boot, DefaultOptions(t.TempDir()))
	if err != nil {
		return nil, err
	}
	img, err := rafs.NewImage(bytes.NewReader(boot.Bytes()), int64(boot.Len()))
	if err != nil {
		t.Fatalf("reader rejects the bootstrap: %v", err)
	}
	return img.FS([]io.ReaderAt{bytes.NewReader(tarBytes)}), nil
}

func TestTarHostile(t *testing.T) {
	escapes := []struct {
		name string
		ents []tarEntry
		want string
	}{
		{"dotdot", []tarEntry{reg("../evil", "x")}, `"../evil": path "../evil" escapes the root`},
		{"inner dotdot", []tarEntry{reg("a/../../evil", "x")}, `"a/../../evil"`},
		{"absolute dotdot", []tarEntry{reg("/../evil", "x")}, "escapes the root"},
		{"hardlink missing", []tarEntry{hardlinkEnt("l", "nowhere")}, `tar entry "l": hard link target "nowhere" not found`},
		{"hardlink later", []tarEntry{hardlinkEnt("l", "f"), reg("f", "x")}, "not found among earlier entries"},
		{"hardlink escape", []tarEntry{reg("f", "x"), hardlinkEnt("l", "../f")}, `tar entry "l": hard link target: path "../f" escapes the root`},
		{"hardlink to dir", []tarEntry{dirEnt("d/", 0o755), hardlinkEnt("l", "d")}, "is a directory"},
		{"through a symlink", []tarEntry{symlinkEnt("s", "/etc"), reg("s/passwd", "x")}, `tar entry "s/passwd": parent "s" is not a directory`},
		{"through a file", []tarEntry{reg("f", "x"), reg("f/g", "y")}, `parent "f" is not a directory`},
		{"root as file", []tarEntry{reg(".", "x")}, "root must be a directory"},
		{"contiguous", []tarEntry{{hdr: tar.Header{Name: "c", Typeflag: tar.TypeCont, Mode: 0o644}}}, `tar entry "c": unsupported entry type '7'`},
		{"global header", []tarEntry{{hdr: tar.Header{Name: "g", Typeflag: tar.TypeXGlobalHeader, PAXRecords: map[string]string{"mtime": "1"}}}}, `PAX global header record "mtime"`},
		{"symlink too long", []tarEntry{symlinkEnt("s", strings.Repeat("x", 5000))}, "symlink target must be"},
		{"bad xattr", []tarEntry{{hdr: tar.Header{Name: "x", Typeflag: tar.TypeReg, Mode: 0o644, Format: tar.FormatPAX,
			PAXRecords: map[string]string{"SCHILY.xattr.system.evil": "v"}}}}, `xattr "system.evil"`},
	}
	for _, c := range escapes {
		t.Run(c.name, func(t *testing.T) {
			_, err := buildTarBytes(t, makeTar(t, c.ents...))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err %v, want one containing %q", err, c.want)
			}
		})
	}

	// archive/tar will not write sparse files; make them by hand.
	oldGNU := rawHeader("old-sparse", 'S', 0, "ustar  \x00")
	paxRecs := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", "s") + paxRecord("GNU.sparse.realsize", "4")
	pax := append(rawHeader("pax", 'x', len(paxRecs), "ustar\x0000"), []byte(paxRecs)...)
	pax = append(pax, make([]byte, 512-len(paxRecs))...)
	pax = append(pax, rawHeader("s", '0', 516, "ustar\x0000")...)
	sparseMap := "1\n0\n4\n" // one fragment: 4 bytes at 0
	pax = append(pax, []byte(sparseMap)...)
	pax = append(pax, make([]byte, 512-len(sparseMap))...)
	pax = append(pax, []byte("data")...)
	pax = append(pax, make([]byte, 508)...)
	for name, in := range map[string][]byte{"old GNU": oldGNU, "PAX 1.0": pax} {
		in = append(in, make([]byte, 1024)...)
		if _, err := buildTarBytes(t, in); err == nil || !strings.Contains(err.Error(), "sparse") {
			t.Errorf("%s sparse file: err %v", name, err)
		}
	}
}

// paxRecord formats "<len> key=value\n", len counting itself.
func paxRecord(k, v string) string {
	n := len(k) + len(v) + 3
	for n != len(fmt.Sprint(n))+len(k)+len(v)+3 {
		n = len(fmt.Sprint(n)) + len(k) + len(v) + 3
	}
	return fmt.Sprintf("%d %s=%s\n", n, k, v)
}

// rawHeader makes a 512-byte tar header block by hand.
func rawHeader(name string, typ byte, size int, magic string) []byte {
	b := make([]byte, 512)
	copy(b, name)
	copy(b[100:], "0000644\x00")
	copy(b[108:], "0000000\x00")
	copy(b[116:], "0000000\x00")
	copy(b[124:], fmt.Sprintf("%011o\x00", size))
	copy(b[136:], "00000000000\x00")
	b[156] = typ
	copy(b[257:], magic)
	copy(b[148:], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

func TestTarTruncated(t *testing.T) {
	good := makeTar(t, reg("a", strings.Repeat("a", 1000)), reg("b", "bbb"))
	// a: header 0, data 512..1536; b: header 1536, data 2048..2560; EOA 2560.
	// Cut at an entry boundary (1536, 2560) is a tar without its
	// end-of-archive blocks, as umoci writes layers: accepted, with the
	// entries before the cut.
	for _, cut := range []int{1536, 2560} {
		fsys, err := buildTarBytes(t, good[:cut])
		if err != nil {
			t.Errorf("tar without end-of-archive blocks, %d bytes: %v", cut, err)
		} else if _, err := fs.Stat(fsys, "a"); err != nil {
			t.Errorf("cut at %d: %v", cut, err)
		}
	}
	for _, cut := range []int{0, 100, 511, 512, 700, 1600, 2048, 2100, 2600} {
		_, err := buildTarBytes(t, good[:cut])
		if err == nil {
			t.Errorf("tar cut at %d bytes accepted", cut)
		} else if cut > 0 && !strings.Contains(err.Error(), "tar") {
			t.Errorf("cut at %d: error %q does not say tar", cut, err)
		}
	}
	if _, err := buildTarBytes(t, good[:3072]); err != nil {
		t.Errorf("tar with one end-of-archive block: %v", err)
	}
	if _, err := buildTarBytes(t, good); err != nil {
		t.Errorf("whole tar: %v", err)
	}
}

func TestTarOCISemantics(t *testing.T) {
	fsys, err := buildTarBytes(t, makeTar(t,
		dirEnt("./", 0o700),
		reg("/abs/file", "absolute names lose their slash"),
		reg("./dot/file", "dot"),
		reg("implicit/parents/file", "parents appear"),
		symlinkEnt("out1", "../../../etc/passwd"),
		symlinkEnt("out2", "/etc/shadow"),
		reg("dup", "first"),
		reg("dup", "second wins"),
		reg("target", "old inode"),
		hardlinkEnt("keeper", "target"),
		reg("target", "new inode"),
		dirEnt("d/", 0o755),
		reg("d/kept", "kept"),
		dirEnt("d/", 0o711),
		reg("replaced/child", "gone"),
		reg("replaced", "a file now"),
		reg("filedir", "a file first"),
		dirEnt("filedir/", 0o755),
		tarEntry{hdr: tar.Header{Name: "g", Typeflag: tar.TypeXGlobalHeader, PAXRecords: map[string]string{"comment": "git archive"}}},
		reg(strings.Repeat("long/", 30)+strings.Repeat("n", 200), "gnu or pax long name"),
		reg("a/b/../c", "cleaned"),
	))
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"abs/file":              "absolute names lose their slash",
		"dot/file":              "dot",
		"implicit/parents/file": "parents appear",
		"dup":                   "second wins",
		"keeper":                "old inode",
		"target":                "new inode",
		"d/kept":                "kept",
		"replaced":              "a file now",
		strings.Repeat("long/", 30) + strings.Repeat("n", 200): "gnu or pax long name",
		"a/c": "cleaned",
	}
	for name, want := range files {
		got, err := fs.ReadFile(fsys, name)
		if err != nil || string(got) != want {
			t.Errorf("%s: %q, %v; want %q", name, got, err, want)
		}
	}
	mode := func(name string) fs.FileMode {
		st, err := fs.Stat(fsys, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return st.Mode()
	}
	if m := mode("."); m != fs.ModeDir|0o700 {
		t.Errorf("root mode %v", m)
	}
	if m := mode("implicit/parents"); m != fs.ModeDir|0o755 {
		t.Errorf("implicit parent mode %v", m)
	}
	if m := mode("d"); m != fs.ModeDir|0o711 {
		t.Errorf("directory over directory: mode %v, want the later 0711", m)
	}
	if m := mode("filedir"); !m.IsDir() {
		t.Errorf("filedir: %v, want the later directory", m)
	}
	for name, want := range map[string]string{"out1": "../../../etc/passwd", "out2": "/etc/shadow"} {
		got, err := fs.ReadLink(fsys, name)
		if err != nil || got != want {
			t.Errorf("symlink %s: %q, %v", name, got, err)
		}
	}
	if _, err := fs.Stat(fsys, "replaced/child"); err == nil {
		t.Error("a file over a directory kept the directory's children")
	}
}

func TestTarGarbage(t *testing.T) {
	for _, in := range [][]byte{nil, make([]byte, 10), bytes.Repeat([]byte{0xff}, 4096), []byte(strings.Repeat("not a tar\n", 200))} {
		if _, err := buildTarBytes(t, in); err == nil {
			t.Errorf("%d bytes of garbage accepted", len(in))
		}
	}
	if fsys, err := buildTarBytes(t, make([]byte, 1024)); err != nil {
		t.Errorf("empty tar: %v", err)
	} else if ents, _ := fs.ReadDir(fsys, "."); len(ents) != 0 {
		t.Errorf("empty tar gave %d entries", len(ents))
	}
}

// FuzzFromTar feeds mutated tars to the tarfs builder: an error is fine, a
// panic or a bootstrap the reader rejects is not.
func FuzzFromTar(f *testing.F) {
	f.Add(makeTar(f, dirEnt("d/", 0o755), reg("d/f", "data"), hardlinkEnt("l", "d/f"), symlinkEnt("s", "d")))
	f.Add(makeTar(f, reg("../x", "x")))
	f.Add(makeTar(f, tarEntry{hdr: tar.Header{Name: "p", Typeflag: tar.TypeReg, Format: tar.FormatPAX,
		PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}, Size: 1}, data: "z"}))
	f.Fuzz(func(t *testing.T, in []byte) {
		var boot bytes.Buffer
		if _, err := FromTar(context.Background(), bytes.NewReader(in), &boot, DefaultOptions(t.TempDir())); err != nil {
			return
		}
		img, err := rafs.NewImage(bytes.NewReader(boot.Bytes()), int64(boot.Len()))
		if err != nil {
			t.Fatalf("reader rejects a bootstrap the builder wrote: %v", err)
		}
		fsys := img.FS([]io.ReaderAt{bytes.NewReader(in)})
		if err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.Type().IsRegular() {
				_, err = fs.ReadFile(fsys, p)
			}
			return err
		}); err != nil {
			t.Fatalf("walking the image: %v", err)
		}
	})
}

// TestBlobMode: blobs the build writes itself (a dir-mode blob, a copied
// tar) get Options.BlobMode, 0644 by default.
func TestBlobMode(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	tb := makeTar(t, dirEnt("d/", 0o755))
	for _, mode := range []os.FileMode{0, 0o600} {
		opts := DefaultOptions(t.TempDir())
		opts.BlobMode = mode
		want := mode
		if want == 0 {
			want = 0o644
		}
		dres, err := FromDir(context.Background(), src, io.Discard, opts)
		if err != nil {
			t.Fatal(err)
		}
		tres, err := FromTar(context.Background(), bytes.NewReader(tb), io.Discard, opts) // not a file: copied
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range []Blob{dres.Blobs[0], tres.Blobs[0]} {
			fi, err := os.Stat(b.Path)
			if err != nil || fi.Mode().Perm() != want {
				t.Errorf("BlobMode %v: %s has mode %v (%v), want %v", mode, b.Path, fi.Mode().Perm(), err, want)
			}
		}
	}
}
