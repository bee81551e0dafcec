package rafs

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// Cross-checks against erofs-utils (Debian 1.5): dump.erofs and fsck.erofs
// read RAFS v6 bootstraps when each blob's uncompressed space is given as
// an extra device (--device). They do not implement the flat mode
// (mapped_blkaddr), so that is checked elsewhere.

// erofsDevice writes the image's blob uncompressed spaces as device files:
// from the real blob for the 2.2 fixture, sparse zeros for the snapshotter
// fixture (its blob is not available).
func erofsDevices(t *testing.T, img *Image, blobs []io.ReaderAt) []string {
	t.Helper()
	var paths []string
	for i := range img.Blobs {
		p := filepath.Join(t.TempDir(), img.Blobs[i].ID())
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		size := int64(img.Blobs[i].UncompressedSize)
		if blobs != nil {
			if _, err := io.Copy(f, io.NewSectionReader(blobs[i], 0, size)); err != nil {
				t.Fatal(err)
			}
		} else if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

func runErofsTool(t *testing.T, tool string, devices []string, args ...string) string {
	t.Helper()
	var all []string
	for _, d := range devices {
		all = append(all, "--device="+d)
	}
	cmd := exec.Command(tool, append(all, args...)...)
	cmd.Env = append(os.Environ(), "TZ=UTC")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(cmd.Args[1:], " "), err, out)
	}
	return string(out)
}

func dumpField(t *testing.T, out, label string) string {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(label) + `:\s*(.*?)\s*$`)
	m := re.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("dump.erofs output lacks %q:\n%s", label, out)
	}
	return m[1]
}

func TestErofsUtilsFixture22(t *testing.T) {
	img, ur := fixture22Uncompressed(t)
	erofsCrossCheck(t, img, []io.ReaderAt{ur}, true, 1)
}

func TestErofsUtilsSnapshotter(t *testing.T) {
	testutil.SkipShort(t)
	img := openFixture(t, fixtureSnap)
	erofsCrossCheck(t, img, nil, false, 97)
}

// erofsCrossCheck compares the superblock with dump.erofs -s, every inode
// (or every sample-th regular file's extents) with dump.erofs --nid, and
// the whole tree with what fsck.erofs --extract writes. With blobs, file
// contents are compared too.
func erofsCrossCheck(t *testing.T, img *Image, blobs []io.ReaderAt, contents bool, sample int) {
	testutil.RequireTool(t, "dump.erofs", "fsck.erofs")
	boot := img.closer.(*os.File).Name()
	devs := erofsDevices(t, img, blobs)

	// Superblock.
	out := runErofsTool(t, "dump.erofs", devs, "-s", boot)
	sb := &img.Superblock
	var devBlocks uint64
	for _, d := range img.DeviceSlots {
		devBlocks += uint64(d.Blocks)
	}
	for label, want := range map[string]string{
		"Filesystem magic number":                      fmt.Sprintf("0x%X", sb.Magic),
		"Filesystem blocks":                            fmt.Sprint(uint64(sb.Blocks) + devBlocks), // 1.5 adds the devices' blocks
		"Filesystem inode metadata start block":        fmt.Sprint(sb.MetaBlkAddr),
		"Filesystem shared xattr metadata start block": fmt.Sprint(sb.XattrBlkAddr),
		"Filesystem root nid":                          fmt.Sprint(sb.RootNid),
		"Filesystem inode count":                       fmt.Sprint(sb.Inos),
		"Filesystem features":                          "chunked_file device_table",
	} {
		if got := dumpField(t, out, label); got != want {
			t.Errorf("dump.erofs %s = %q, we parsed %q", label, got, want)
		}
	}

	// Inodes and extents.
	extRE := regexp.MustCompile(`(?m)^\s*\d+:\s*(\d+)\.\.\s*(\d+)\s*\|\s*(\d+)\s*:\s*(\d+)\.\.\s*(\d+)\s*\|\s*(\d+)\s*# device (\d+)`)
	type walkedEntry struct {
		path string
		e    *Entry
	}
	var entries []walkedEntry
	if err := img.Walk(func(p string, e *Entry) error {
		entries = append(entries, walkedEntry{p, e})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	files := 0
	for _, we := range entries {
		e := we.e
		if !e.IsRegular() && sample > 1 {
			continue
		}
		if e.IsRegular() {
			if files++; files%sample != 0 && we.path != "/usr/bin/bash" {
				continue
			}
		}
		out := runErofsTool(t, "dump.erofs", devs, fmt.Sprintf("--nid=%d", e.Nid), "-e", boot)
		mtime := e.Mtime
		if !e.Inode.Extended() {
			// dump.erofs 1.5 ignores the compact inodes' mtime delta,
			// which the kernel adds (reader_kernel_test.go checks it).
			mtime = img.Superblock.BuildTime
		}
		mt := time.Unix(int64(mtime), int64(e.MtimeNsec)).UTC().Format("2006-01-02 15:04:05.000000000")
		want := []string{
			fmt.Sprintf("Size: %d  ", e.Size),
			fmt.Sprintf("Inode size: %d   Extent size: 0   Xattr size: %d\n", e.Inode.SizeOnDisk(), e.Inode.XattrSize()),
			fmt.Sprintf("NID: %d   Links: %d   Layout: %d", e.Nid, e.Nlink, e.Inode.Layout()),
			// dump.erofs 1.5 prints only the permission bits.
			fmt.Sprintf("Uid: %d   Gid: %d  Access: %04o/", e.UID, e.GID, e.Mode&0o777),
			"Timestamp: " + mt,
		}
		if e.IsDir() || e.Nlink == 1 { // dump.erofs names a hard link by its first path
			want = append(want, fmt.Sprintf("File : %s\n", we.path))
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: dump.erofs lacks %q:\n%s", we.path, w, out)
			}
		}
		if !e.IsRegular() || e.Size == 0 {
			continue
		}
		exts, err := img.FileExtents(e)
		if err != nil {
			t.Fatal(err)
		}
		ms := extRE.FindAllStringSubmatch(out, -1)
		if len(ms) != len(exts) {
			t.Errorf("%s: dump.erofs shows %d extents, we have %d:\n%s", we.path, len(ms), len(exts), out)
			continue
		}
		bs := uint64(img.BlockSize)
		for i, m := range ms {
			x := exts[i]
			logical, _ := strconv.ParseUint(m[1], 10, 64)
			physical, _ := strconv.ParseUint(m[4], 10, 64)
			plen, _ := strconv.ParseUint(m[6], 10, 64)
			dev, _ := strconv.Atoi(m[7])
			// dump.erofs rounds the length up to whole blocks.
			if logical != x.FileOffset || physical != x.BlobOffset || dev != x.Blob+1 || plen != (x.Length+bs-1)/bs*bs {
				t.Errorf("%s extent %d: dump.erofs %v, ours %+v", we.path, i, m[1:], x)
			}
		}
	}

	// The extracted tree.
	dir := filepath.Join(t.TempDir(), "x")
	runErofsTool(t, "fsck.erofs", devs, "--extract="+dir, boot)
	var fsys fs.FS
	if contents {
		fsys = img.FS(blobs)
	}
	asRoot := os.Geteuid() == 0
	seen := 0
	for _, we := range entries {
		e := we.e
		p := filepath.Join(dir, we.path)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Errorf("fsck.erofs did not extract %s: %v", we.path, err)
			continue
		}
		seen++
		st := fi.Sys().(*syscall.Stat_t)
		// fsck.erofs 1.5 chowns after chmod, which clears setuid and
		// setgid, and dump.erofs 1.5 prints only the permission bits:
		// neither shows those two bits (the raw mode is checked by the
		// fixture tests).
		if uint16(st.Mode)&ModeTypeMask != e.Mode&ModeTypeMask || (!e.IsSymlink() && uint16(st.Mode)&0o1777 != e.Mode&0o1777) {
			t.Errorf("%s: extracted mode %#o, ours %#o", we.path, st.Mode, e.Mode)
		}
		if asRoot && (st.Uid != e.UID || st.Gid != e.GID) {
			t.Errorf("%s: extracted owner %d:%d, ours %d:%d", we.path, st.Uid, st.Gid, e.UID, e.GID)
		}
		wantMtime := e.Mtime
		if !e.Inode.Extended() {
			wantMtime = img.Superblock.BuildTime // 1.5 ignores the delta, as above
		}
		if !e.IsDir() && fi.ModTime().Unix() != int64(wantMtime) {
			t.Errorf("%s: extracted mtime %v, ours %v", we.path, fi.ModTime(), e.ModTime())
		}
		switch {
		case e.IsSymlink():
			if target, err := os.Readlink(p); err != nil || target != e.Target {
				t.Errorf("%s: extracted link %q (%v), ours %q", we.path, target, err, e.Target)
			}
		case e.IsRegular():
			if uint64(fi.Size()) != e.Size {
				t.Errorf("%s: extracted size %d, ours %d", we.path, fi.Size(), e.Size)
			}
			if fsys != nil {
				theirs, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				ours, err := fs.ReadFile(fsys, strings.TrimPrefix(we.path, "/"))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(ours, theirs) {
					t.Errorf("%s: contents differ from fsck.erofs' extraction", we.path)
				}
			}
		}
	}
	extracted := 0
	if err := filepath.WalkDir(dir, func(string, fs.DirEntry, error) error { extracted++; return nil }); err != nil {
		t.Fatal(err)
	}
	if extracted != len(entries) || seen != len(entries) {
		t.Errorf("fsck.erofs extracted %d entries, we walked %d (%d matched)", extracted, len(entries), seen)
	}
}

// The synthetic images (xattrs, compact inodes, devices, fifos, sockets,
// hard links, multi-block and plain directories, 4 KiB chunks) read the
// same through erofs-utils as through the reader.
func TestErofsUtilsSynth(t *testing.T) {
	for _, opts := range []synthOpts{{chunkBits: 0}, {chunkBits: 8, inlineDirs: true}} {
		t.Run(fmt.Sprintf("chunkbits=%d,inline=%v", opts.chunkBits, opts.inlineDirs), func(t *testing.T) {
			boot, blob := buildSynth(t, opts, synthTree())
			p := filepath.Join(t.TempDir(), "synth.boot")
			if err := os.WriteFile(p, boot, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			erofsCrossCheck(t, img, []io.ReaderAt{bytes.NewReader(blob)}, true, 1)
		})
	}
}
