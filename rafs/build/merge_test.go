package build

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Test layers are written with merge-prefixed helpers so that they cannot
// clash with the other test files of the package.

var mergeTime = time.Unix(1700000000, 123456789)

func mergeFile(name, data string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data)),
		ModTime: mergeTime, Format: tar.FormatPAX}, data: data}
}

func mergeDirEnt(name string, mode int64) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode, ModTime: mergeTime, Format: tar.FormatPAX}}
}

func mergeLink(name, target string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target, ModTime: mergeTime}}
}

func mergeSymlink(name, target string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777, ModTime: mergeTime}}
}

// mergeLayers builds each tar as a tarfs layer and merges them; it returns
// the merged image and the tars as its blobs, in blob-table order.
func mergeLayers(t *testing.T, tars ...[]byte) (*rafs.Image, []io.ReaderAt, string) {
	t.Helper()
	dir := t.TempDir()
	blobDir := filepath.Join(dir, "blobs")
	var boots []string
	for i, tb := range tars {
		var boot bytes.Buffer
		opts := DefaultOptions(blobDir)
		if _, err := FromTar(context.Background(), bytes.NewReader(tb), &boot, opts); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		p := filepath.Join(dir, fmt.Sprintf("layer%d.boot", i))
		if err := os.WriteFile(p, boot.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		boots = append(boots, p)
	}
	out := filepath.Join(dir, "image.boot")
	var merged bytes.Buffer
	res, err := MergeFiles(context.Background(), boots, &merged, MergeOptions{})
	if err != nil {
		t.Fatalf("merge: %v", err)
	}
	if res.Bootstrap.Size != int64(merged.Len()) {
		t.Fatalf("result says %d bytes, wrote %d", res.Bootstrap.Size, merged.Len())
	}
	if err := os.WriteFile(out, merged.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := rafs.Open(out)
	if err != nil {
		t.Fatalf("reader rejects the merged bootstrap: %v", err)
	}
	t.Cleanup(func() { img.Close() })
	var blobs []io.ReaderAt
	for i := range img.Blobs {
		f, err := os.Open(filepath.Join(blobDir, img.Blobs[i].ID()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		blobs = append(blobs, f)
	}
	return img, blobs, blobDir
}

// describeImage lists every path of an image with its type, permissions,
// owner, content or target, xattrs and hard-link partner paths.
func describeImage(t *testing.T, img *rafs.Image, blobs []io.ReaderAt) map[string]string {
	t.Helper()
	fsys := img.FS(blobs)
	byNid := map[uint64][]string{}
	got := map[string]string{}
	err := img.Walk(func(p string, e *rafs.Entry) error {
		var s string
		switch {
		case e.IsDir():
			s = fmt.Sprintf("dir %o", e.Mode&0o7777)
		case e.IsSymlink():
			s = "symlink " + e.Target
		case e.IsRegular():
			rel := strings.TrimPrefix(p, "/")
			data, err := fs.ReadFile(fsys, rel)
			if err != nil {
				return err
			}
			s = fmt.Sprintf("file %o %q", e.Mode&0o7777, data)
			byNid[e.Nid] = append(byNid[e.Nid], p)
		default:
			s = fmt.Sprintf("mode %o rdev %#x", e.Mode, e.Rdev)
		}
		if e.UID != 0 || e.GID != 0 {
			s += fmt.Sprintf(" owner %d:%d", e.UID, e.GID)
		}
		for _, x := range e.Xattrs {
			s += fmt.Sprintf(" xattr %s=%s", x.Name, x.Value)
		}
		got[p] = s
		return nil
	})
	if err != nil {
		t.Fatalf("walk: %v", err)
	}
	for _, paths := range byNid {
		if len(paths) > 1 {
			sort.Strings(paths)
			for _, p := range paths {
				got[p] += " links " + strings.Join(paths, ",")
			}
		}
	}
	return got
}

func diffDescriptions(t *testing.T, want, got map[string]string) {
	t.Helper()
	var diffs []string
	for p, w := range want {
		if g, ok := got[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: missing, want %s", p, w))
		} else if g != w {
			diffs = append(diffs, fmt.Sprintf("%s: got %s\n    want %s", p, g, w))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: unexpected %s", p, g))
		}
	}
	sort.Strings(diffs)
	if len(diffs) > 0 {
		t.Errorf("merged tree differs:\n%s", strings.Join(diffs, "\n"))
	}
}

// mergeOCILayers are three layers exercising every rule of Merge.
func mergeOCILayers(t *testing.T) [][]byte {
	withXattr := mergeFile("etc/x", "xattrs")
	withXattr.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.color": "blue"}
	owned := mergeFile("etc/owned", "mine")
	owned.hdr.Uid, owned.hdr.Gid = 1234, 5678
	dev := tarEntry{hdr: tar.Header{Name: "dev/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mergeTime}}

	l1 := makeTar(t,
		mergeDirEnt("etc/", 0o755),
		mergeFile("etc/a", "A1"),
		mergeFile("etc/b", "B1"),
		withXattr, owned,
		mergeDirEnt("etc/keep/", 0o700),
		mergeFile("etc/keep/k", "K1"),
		mergeDirEnt("opq/", 0o755),
		mergeFile("opq/o1", "O1"),
		mergeDirEnt("opq/sub/", 0o755),
		mergeFile("opq/sub/o2", "O2"),
		mergeFile("file2dir", "was a file"),
		mergeDirEnt("dir2file/", 0o755),
		mergeDirEnt("dir2file/sub/", 0o755),
		mergeFile("dir2file/sub/z", "Z"),
		mergeFile("hl1", "linked"),
		mergeLink("hl2", "hl1"),
		mergeSymlink("sym", "etc/a"),
		mergeFile("-x", "old"),
		mergeDirEnt("dev/", 0o755),
		dev,
	)
	l2 := makeTar(t,
		mergeDirEnt("etc/", 0o750),
		mergeFile("etc/.wh.a", ""),
		mergeFile("etc/a2", "A2"),
		// No header for etc/keep/: its 0700 from layer 1 must stay.
		mergeFile("etc/keep/new", "N2"),
		mergeDirEnt("opq/", 0o711),
		mergeFile("opq/.wh..wh..opq", ""),
		mergeFile("opq/o3", "O3"),
		mergeDirEnt("file2dir/", 0o755),
		mergeFile("file2dir/inner", "now inside a dir"),
		mergeFile("dir2file", "was a dir"),
		mergeFile(".wh.hl1", ""),
		// The whiteout sorts after its target: it must still act on
		// layer 1's "-x" only.
		mergeFile("-x", "new"),
		mergeFile(".wh.-x", ""),
		mergeFile("l2a", "pair"),
		mergeLink("l2b", "l2a"),
		mergeFile(".wh.never-existed", ""),
	)
	l3 := makeTar(t,
		mergeFile(".wh.file2dir", ""),
		mergeDirEnt("dir2file/", 0o700),
		mergeFile("dir2file/again", "dir again"),
		mergeFile("l2a", "replaced"),
		mergeFile("etc/b", "B3"),
	)
	return [][]byte{l1, l2, l3}
}

func TestMergeOCISemantics(t *testing.T) {
	img, blobs, _ := mergeLayers(t, mergeOCILayers(t)...)
	if len(img.Blobs) != 3 || !img.IsTarfs() || img.BlockSize != 512 {
		t.Fatalf("merged image: %d blobs, tarfs %v, block size %d; want 3, true, 512", len(img.Blobs), img.IsTarfs(), img.BlockSize)
	}
	want := map[string]string{
		"/":               "dir 755",
		"/etc":            "dir 750",
		"/etc/a2":         `file 644 "A2"`,
		"/etc/b":          `file 644 "B3"`,
		"/etc/x":          `file 644 "xattrs" xattr user.color=blue`,
		"/etc/owned":      `file 644 "mine" owner 1234:5678`,
		"/etc/keep":       "dir 700",
		"/etc/keep/k":     `file 644 "K1"`,
		"/etc/keep/new":   `file 644 "N2"`,
		"/opq":            "dir 711",
		"/opq/o3":         `file 644 "O3"`,
		"/dir2file":       "dir 700",
		"/dir2file/again": `file 644 "dir again"`,
		"/hl2":            `file 644 "linked"`,
		"/sym":            "symlink etc/a",
		"/-x":             `file 644 "new"`,
		"/l2a":            `file 644 "replaced"`,
		"/l2b":            `file 644 "pair"`,
		"/dev":            "dir 755",
		"/dev/null":       "mode 20666 rdev 0x103",
	}
	diffDescriptions(t, want, describeImage(t, img, blobs))

	// Each file's chunks point into its own layer's tar.
	for p, blob := range map[string]int{"/etc/a2": 1, "/etc/b": 2, "/etc/keep/k": 0, "/hl2": 0, "/l2b": 1} {
		e, err := img.Lookup(p)
		if err != nil {
			t.Fatal(err)
		}
		exts, err := img.FileExtents(e)
		if err != nil {
			t.Fatal(err)
		}
		if len(exts) != 1 || exts[0].Blob != blob {
			t.Errorf("%s: extents %+v, want one in blob %d", p, exts, blob)
		}
	}
}

// TestMergeWhiteoutUnderNonDir: a whiteout whose parent is no directory
// in the merged view deletes nothing. umoci writes a directory replaced by
// a file as the file followed by whiteouts beneath it; a whiteout below a
// lower file or below nothing leaves the file and creates no directory
// (umoci's extraction of the same layers).
func TestMergeWhiteoutUnderNonDir(t *testing.T) {
	l1 := makeTar(t,
		mergeDirEnt("usr/", 0o755),
		mergeDirEnt("usr/share/", 0o755),
		mergeDirEnt("usr/share/man/", 0o755),
		mergeDirEnt("usr/share/man/cs/", 0o755),
		mergeDirEnt("usr/share/man/cs/man1/", 0o755),
		mergeFile("usr/share/man/cs/man1/ls.1", "cs ls"),
		mergeDirEnt("usr/share/man/man1/", 0o755),
		mergeFile("usr/share/man/man1/ls.1", "ls"),
		mergeFile("f", "F"),
	)
	l2 := makeTar(t,
		mergeFile("usr/share/man", "a file now"),
		mergeFile("usr/share/man/.wh.cs", ""),
		mergeFile("usr/share/man/man1/.wh.ls.1", ""),
		mergeFile("usr/share/man/.wh..wh..opq", ""),
		mergeFile("f/.wh.y", ""),
		mergeFile("f/sub/.wh.z", ""),
		mergeFile("g/h/.wh.z", ""),
	)
	img, blobs, _ := mergeLayers(t, l1, l2)
	diffDescriptions(t, map[string]string{
		"/":              "dir 755",
		"/usr":           "dir 755",
		"/usr/share":     "dir 755",
		"/usr/share/man": `file 644 "a file now"`,
		"/f":             `file 644 "F"`,
	}, describeImage(t, img, blobs))

	// The layer's own image has the file and none of the whiteouts below it.
	fsys, err := buildTarBytes(t, l2)
	if err != nil {
		t.Fatal(err)
	}
	if data, err := fs.ReadFile(fsys, "usr/share/man"); err != nil || string(data) != "a file now" {
		t.Errorf("layer image: usr/share/man = %q, %v", data, err)
	}
}

// TestMergeHardlinkSurvivesUpperName: a hard-linked inode whose first name
// is replaced above keeps its other names linked together.
func TestMergeHardlinkSurvivesUpperName(t *testing.T) {
	l1 := makeTar(t, mergeFile("a", "shared"), mergeLink("b", "a"), mergeLink("c", "a"))
	l2 := makeTar(t, mergeFile("a", "upper"))
	img, blobs, _ := mergeLayers(t, l1, l2)
	diffDescriptions(t, map[string]string{
		"/":  "dir 755",
		"/a": `file 644 "upper"`,
		"/b": `file 644 "shared" links /b,/c`,
		"/c": `file 644 "shared" links /b,/c`,
	}, describeImage(t, img, blobs))
	e, err := img.Lookup("/b")
	if err != nil {
		t.Fatal(err)
	}
	if e.Nlink != 2 {
		t.Errorf("nlink of /b = %d, want 2", e.Nlink)
	}
}

// TestMergeSameLayerTwice: an image may list one layer twice; its blob is
// shared, not repeated.
func TestMergeSameLayerTwice(t *testing.T) {
	l1 := makeTar(t, mergeFile("a", "A"))
	l2 := makeTar(t, mergeFile("b", "B"))
	img, blobs, _ := mergeLayers(t, l1, l2, l1)
	if len(img.Blobs) != 2 {
		t.Fatalf("%d blobs, want 2", len(img.Blobs))
	}
	diffDescriptions(t, map[string]string{"/": "dir 755", "/a": `file 644 "A"`, "/b": `file 644 "B"`},
		describeImage(t, img, blobs))
}

// TestMergeRootMetadata: the root takes an explicit "./" entry of an upper
// layer, and keeps it when an upper layer has none.
func TestMergeRootMetadata(t *testing.T) {
	root := mergeDirEnt("./", 0o711)
	root.hdr.Uid = 7
	l1 := makeTar(t, root, mergeFile("a", "A"))
	l2 := makeTar(t, mergeFile("b", "B"))
	img, blobs, _ := mergeLayers(t, l1, l2)
	got := describeImage(t, img, blobs)
	if got["/"] != "dir 711 owner 7:0" {
		t.Errorf("root: %s, want dir 711 owner 7:0", got["/"])
	}
}

func TestMergeErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := Merge(ctx, nil, io.Discard, MergeOptions{}); err == nil || !strings.Contains(err.Error(), "no layers") {
		t.Errorf("no layers: %v", err)
	}
	// Layers of different chunk sizes cannot share a bootstrap.
	dir := t.TempDir()
	var boots []string
	for i, cs := range []uint32{1 << 20, 64 << 10} {
		opts := DefaultOptions(dir)
		opts.ChunkSize = cs
		var b bytes.Buffer
		if _, err := FromTar(ctx, bytes.NewReader(makeTar(t, mergeFile(fmt.Sprint(i), "x"))), &b, opts); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, fmt.Sprint(i, ".boot"))
		if err := os.WriteFile(p, b.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		boots = append(boots, p)
	}
	_, err := MergeFiles(ctx, boots, io.Discard, MergeOptions{Names: []string{"base", "top"}})
	if err == nil || !strings.Contains(err.Error(), "top: chunk size 65536 differs") {
		t.Errorf("mixed chunk sizes: %v", err)
	}
	// A file that is not a bootstrap is named in the error.
	junk := filepath.Join(dir, "junk")
	if err := os.WriteFile(junk, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = MergeFiles(ctx, []string{boots[0], junk}, io.Discard, MergeOptions{})
	if err == nil || !strings.Contains(err.Error(), "layer 1") {
		t.Errorf("junk layer: %v", err)
	}
	// Cancellation stops the merge.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := MergeFiles(cctx, boots[:1], io.Discard, MergeOptions{}); err == nil {
		t.Error("merge with a cancelled context succeeded")
	}
}

// TestMergeKernel mounts the merged image's flat disk and compares the
// kernel's view with the reader's, every field treecmp knows.
func TestMergeKernel(t *testing.T) {
	testutil.RequireRoot(t)
	img, blobs, blobDir := mergeLayers(t, mergeOCILayers(t)...)
	want := scanImage(t, img, blobs)

	dir := t.TempDir()
	boot := filepath.Join(dir, "image.boot")
	raw := make([]byte, img.Size)
	if _, err := img.ReaderAt().ReadAt(raw, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(boot, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	dev, err := blockdev.Open(context.Background(), boot, blockdev.LocalBlobs{Dir: blobDir})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	disk := filepath.Join(dir, "image.disk")
	if _, err := blockdev.Export(context.Background(), dev, disk, blockdev.ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	mnt := testutil.MountErofs(t, disk, "loop")
	opts := treecmp.Options{XattrPrefixes: []string{"user.", "trusted."}}
	got, err := treecmp.Scan(mnt, opts)
	if err != nil {
		t.Fatal(err)
	}
	if diffs := treecmp.Diff(want, got, opts); len(diffs) > 0 {
		t.Errorf("kernel view differs from the reader's:\n%s", treecmp.Summary(diffs, 40))
	}
	if len(got) != len(want) || len(got) < 15 {
		t.Errorf("kernel shows %d paths, reader %d", len(got), len(want))
	}
	for p := range got {
		if strings.Contains(p, ".wh.") {
			t.Errorf("whiteout %s is visible in the mounted image", p)
		}
	}
}

// scanImage describes an image through the reader the way treecmp.Scan
// describes a mounted tree.
func scanImage(t *testing.T, img *rafs.Image, blobs []io.ReaderAt) map[string]*treecmp.Entry {
	t.Helper()
	fsys := img.FS(blobs)
	out := map[string]*treecmp.Entry{}
	byNid := map[uint64][]string{}
	err := img.Walk(func(p string, e *rafs.Entry) error {
		rel := strings.TrimPrefix(p, "/")
		if rel == "" {
			rel = "."
		}
		te := &treecmp.Entry{Path: rel, Perm: uint32(e.Mode & 0o7777), UID: e.UID, GID: e.GID,
			MtimeNsec: e.ModTime().UnixNano()}
		switch e.Mode & rafs.ModeTypeMask {
		case rafs.ModeRegular:
			data, err := fs.ReadFile(fsys, rel)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			te.Type, te.Size, te.SHA256 = "reg", int64(len(data)), hex.EncodeToString(sum[:])
			byNid[e.Nid] = append(byNid[e.Nid], rel)
		case rafs.ModeDir:
			te.Type = "dir"
		case rafs.ModeSymlink:
			te.Type, te.Size, te.Target = "symlink", int64(len(e.Target)), e.Target
		case rafs.ModeChar, rafs.ModeBlock:
			te.Type = map[uint16]string{rafs.ModeChar: "chr", rafs.ModeBlock: "blk"}[e.Mode&rafs.ModeTypeMask]
			te.Rdev = unix.Mkdev(e.Rdev>>8&0xFFF, e.Rdev&0xFF|e.Rdev>>12&^0xFF)
		case rafs.ModeFifo:
			te.Type = "fifo"
		default:
			te.Type = "sock"
		}
		if len(e.Xattrs) > 0 {
			te.Xattrs = map[string]string{}
			for _, x := range e.Xattrs {
				te.Xattrs[x.Name] = string(x.Value)
			}
		}
		out[rel] = te
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, paths := range byNid {
		if len(paths) > 1 {
			sort.Strings(paths)
			for _, p := range paths {
				out[p].LinkGroup = paths[0]
			}
		}
	}
	return out
}

// BenchmarkMerge merges three layers of 10,000 files each (the upper ones
// replacing and whiting out a share of the base).
func BenchmarkMerge(b *testing.B) {
	dir := b.TempDir()
	var boots []string
	for l := range 3 {
		var ents []tarEntry
		for i := range 10000 {
			name := fmt.Sprintf("usr/share/pkg%03d/file%05d", i%100, i)
			switch {
			case l > 0 && i%7 == 0:
				ents = append(ents, mergeFile(fmt.Sprintf("usr/share/pkg%03d/.wh.file%05d", i%100, i), ""))
			case l == 0 || i%5 == 0:
				ents = append(ents, mergeFile(name, fmt.Sprint("layer ", l, " file ", i)))
			}
		}
		var boot bytes.Buffer
		if _, err := FromTar(context.Background(), bytes.NewReader(makeTar(b, ents...)), &boot, DefaultOptions(dir)); err != nil {
			b.Fatal(err)
		}
		p := filepath.Join(dir, fmt.Sprint(l, ".boot"))
		if err := os.WriteFile(p, boot.Bytes(), 0o644); err != nil {
			b.Fatal(err)
		}
		boots = append(boots, p)
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := MergeFiles(context.Background(), boots, io.Discard, MergeOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}
