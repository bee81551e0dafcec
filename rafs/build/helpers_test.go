package build

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Test-only stand-ins for what other packages do for real: lay an image out
// as one flat EROFS device (blockdev's job) by re-reading what the builder
// wrote, and mount it.

// bootInfo is what the flat layout needs from a bootstrap.
type bootInfo struct {
	sb    rafs.Superblock
	ext   rafs.ExtSuperblock
	slots []rafs.DeviceSlot
	blobs []rafs.BlobEntry
}

func readBoot(t *testing.T, boot []byte) bootInfo {
	t.Helper()
	var bi bootInfo
	if len(boot) < 4096 || len(boot)%4096 != 0 {
		t.Fatalf("bootstrap size %d is not a positive multiple of 4096", len(boot))
	}
	bi.sb.Decode(boot[rafs.SuperblockOffset:])
	bi.ext.Decode(boot[rafs.ExtSuperblockOffset:])
	for i := range int(bi.sb.ExtraDevices) {
		var s rafs.DeviceSlot
		s.Decode(boot[rafs.DeviceSlotOffset+rafs.DeviceSlotSize*i:])
		var e rafs.BlobEntry
		e.Decode(boot[int(bi.ext.BlobTableOffset)+rafs.BlobEntrySize*i:])
		bi.slots = append(bi.slots, s)
		bi.blobs = append(bi.blobs, e)
	}
	return bi
}

// blobSpace returns a blob's uncompressed address space: the tar itself for
// tarfs, the decompressed chunks at their offsets otherwise. It checks the
// blob's chunk-info header against the blob-table entry on the way.
func blobSpace(t *testing.T, path string, e rafs.BlobEntry) []byte {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if e.IsTarfs() {
		return raw
	}
	if uint64(len(raw)) != e.CompressedSize {
		t.Fatalf("blob %s: %d bytes, entry says compressed_size %d", path, len(raw), e.CompressedSize)
	}
	hoff := e.CIOffset + e.CICompressedSize
	if hoff+rafs.BlobMetaHeaderSize != uint64(len(raw)) {
		t.Fatalf("blob %s: header at %d does not end the blob (%d bytes)", path, hoff, len(raw))
	}
	var h rafs.BlobMetaHeader
	h.Decode(raw[hoff:])
	if h.Magic != rafs.BlobMetaMagic || h.Magic2 != rafs.BlobMetaMagic || h.CIOffset != e.CIOffset ||
		h.CICompressedSize != e.CICompressedSize || h.CIUncompressedSize != e.CIUncompressedSize ||
		h.CICompressor != e.CICompressor || h.CIEntries != e.ChunkCount || h.Features != e.Features {
		t.Fatalf("blob %s: meta header %+v disagrees with entry %+v", path, h, e)
	}
	ci := make([]byte, e.CIUncompressedSize)
	if err := rafs.Decompress(e.CICompressor, ci, raw[e.CIOffset:hoff]); err != nil {
		t.Fatal(err)
	}
	space := make([]byte, e.UncompressedSize)
	for i := range int(e.ChunkCount) {
		c := rafs.DecodeCIv1(ci[rafs.CIv1EntrySize*i:])
		dst := space[c.UncompressedOffset : c.UncompressedOffset+uint64(c.UncompressedSize)]
		src := raw[c.CompressedOffset : c.CompressedOffset+uint64(c.CompressedSize)]
		comp := rafs.CompressNone
		if c.Compressed() {
			comp = e.Compressor
		}
		if err := rafs.Decompress(comp, dst, src); err != nil {
			t.Fatalf("blob %s chunk %d: %v", path, i, err)
		}
	}
	return space
}

// flatImage writes the flat device of a bootstrap and its blobs (spec §14)
// to a file and returns its path.
func flatImage(t *testing.T, bootPath, blobDir string) string {
	t.Helper()
	boot, err := os.ReadFile(bootPath)
	if err != nil {
		t.Fatal(err)
	}
	bi := readBoot(t, boot)
	bs := int64(1) << bi.sb.BlkSzBits
	img := filepath.Join(t.TempDir(), "flat.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(boot); err != nil {
		t.Fatal(err)
	}
	end := int64(len(boot))
	for i, s := range bi.slots {
		id := strings.TrimRight(string(s.BlobID[:]), "\x00")
		if s.MappedBlkAddr == 0 || int64(s.MappedBlkAddr)*bs < end {
			t.Fatalf("slot %d: mapped_blkaddr %d overlaps what precedes it (%d bytes)", i, s.MappedBlkAddr, end)
		}
		space := blobSpace(t, filepath.Join(blobDir, id), bi.blobs[i])
		n := int64(s.Blocks) * bs
		if _, err := f.WriteAt(space[:n], int64(s.MappedBlkAddr)*bs); err != nil {
			t.Fatal(err)
		}
		end = int64(s.MappedBlkAddr)*bs + n
	}
	if err := f.Truncate(end); err != nil {
		t.Fatal(err)
	}
	return img
}

// uncompressedBlob writes a blob's uncompressed space to a file (what
// fsck.erofs --device= and mount -o device= want).
func uncompressedBlob(t *testing.T, path string, e rafs.BlobEntry) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), filepath.Base(path)+".raw")
	if err := os.WriteFile(out, blobSpace(t, path, e), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// fileState is everything compared about one path of a tree.
type fileState struct {
	Type      string
	Perm      uint32 // permission bits incl. setuid, setgid, sticky
	UID, GID  uint32
	Size      int64 // non-directories
	SHA256    string
	Target    string
	Rdev      string
	Xattrs    string
	Mtime     string
	LinkGroup string // every path sharing the inode, sorted
}

// snapshot records every path under root. skip, when set, leaves paths out
// (tarfs has no sockets).
func snapshot(t *testing.T, root string, skip func(rel string, st *unix.Stat_t) bool) map[string]fileState {
	t.Helper()
	states := make(map[string]fileState)
	groups := make(map[uint64][]string)
	inoOf := make(map[string]uint64)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if skip != nil && skip(rel, &st) {
			return nil
		}
		s := fileState{
			Perm: st.Mode & 0o7777,
			UID:  st.Uid, GID: st.Gid,
			Mtime: fmt.Sprintf("%d.%09d", st.Mtim.Sec, st.Mtim.Nsec),
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			s.Type = "dir"
		case unix.S_IFREG:
			s.Type = "reg"
			s.Size = st.Size
			s.SHA256 = testutil.FileSHA256(t, p)
		case unix.S_IFLNK:
			s.Type = "symlink"
			s.Size = st.Size
			s.Target, err = os.Readlink(p)
			if err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			s.Type = map[uint32]string{unix.S_IFCHR: "chr", unix.S_IFBLK: "blk"}[st.Mode&unix.S_IFMT]
			s.Rdev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			s.Type = "fifo"
		case unix.S_IFSOCK:
			s.Type = "sock"
		}
		s.Xattrs = xattrString(t, p)
		states[rel] = s
		if s.Type != "dir" {
			groups[st.Ino] = append(groups[st.Ino], rel)
			inoOf[rel] = st.Ino
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking %s: %v", root, err)
	}
	for rel, ino := range inoOf {
		s := states[rel]
		g := slices.Clone(groups[ino])
		slices.Sort(g)
		s.LinkGroup = strings.Join(g, "|")
		states[rel] = s
	}
	return states
}

func xattrString(t *testing.T, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ENOTSUP) {
		return ""
	}
	if err != nil {
		t.Fatalf("llistxattr %s: %v", p, err)
	}
	names := splitNul(buf[:n])
	slices.Sort(names)
	var b strings.Builder
	val := make([]byte, 64<<10)
	for _, name := range names {
		m, err := unix.Lgetxattr(p, name, val)
		if err != nil {
			t.Fatalf("lgetxattr %s %s: %v", p, name, err)
		}
		fmt.Fprintf(&b, "%s=%x;", name, val[:m])
	}
	return b.String()
}

// compareTrees fails the test with every difference between two snapshots.
func compareTrees(t *testing.T, want, got map[string]fileState) {
	t.Helper()
	var diffs []string
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("missing %q", p))
			continue
		}
		if w != g {
			diffs = append(diffs, fmt.Sprintf("%q:\n  want %+v\n  got  %+v", p, w, g))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("unexpected %q", p))
		}
	}
	slices.Sort(diffs)
	if len(diffs) > 0 {
		if len(diffs) > 20 {
			diffs = append(diffs[:20], fmt.Sprintf("... and %d more", len(diffs)-20))
		}
		t.Errorf("trees differ (%d paths compared):\n%s", len(want), strings.Join(diffs, "\n"))
	}
}
