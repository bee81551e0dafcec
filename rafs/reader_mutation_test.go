package rafs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"os"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// Byte offsets inside rafs-v6-2.2.boot (see the fixtures README).
const (
	offSB       = SuperblockOffset
	offExt      = ExtSuperblockOffset
	offSlot     = DeviceSlotOffset
	offBlob     = 4096
	offChunkTbl = 16384
	offRoot     = 8192 + 128*32 // nid 128, extended, inline dir tail at +64
	offRootData = offRoot + 64
	offLibRs    = 8192 + 133*32 // chunk index at +64
	offLibRsIdx = offLibRs + 64
)

func put16(b []byte, off int, v uint16) { binary.LittleEndian.PutUint16(b[off:], v) }
func put32(b []byte, off int, v uint32) { binary.LittleEndian.PutUint32(b[off:], v) }
func put64(b []byte, off int, v uint64) { binary.LittleEndian.PutUint64(b[off:], v) }

// checkAll opens an image from b and reads everything a consumer would:
// the walk, every directory and every file's extents.
func checkAll(b []byte) error {
	img, err := NewImage(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		return err
	}
	return img.Walk(func(p string, e *Entry) error {
		if e.IsRegular() {
			if _, err := img.FileExtents(e); err != nil {
				return err
			}
		}
		return nil
	})
}

type mutation struct {
	name  string
	field string // FormatError.Field expected (exact)
	edit  func(b []byte) []byte
}

func runMutations(t *testing.T, fixture string, ms []mutation) {
	orig, err := os.ReadFile(testutil.NydusFixture(t, fixture))
	if err != nil {
		t.Fatal(err)
	}
	if err := checkAll(orig); err != nil {
		t.Fatalf("unmodified fixture: %v", err)
	}
	for _, m := range ms {
		t.Run(m.name, func(t *testing.T) {
			b := m.edit(bytes.Clone(orig))
			err := checkAll(b)
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("got %v, want a FormatError for field %q", err, m.field)
			}
			if fe.Field != m.field {
				t.Errorf("FormatError field %q, want %q (%v)", fe.Field, m.field, err)
			}
			if !strings.HasPrefix(err.Error(), "rafs: ") && !strings.Contains(err.Error(), "rafs: ") {
				t.Errorf("error %q lacks the rafs: prefix", err)
			}
		})
	}
}

func TestMutations22(t *testing.T) {
	set := func(off int, v ...byte) func([]byte) []byte {
		return func(b []byte) []byte { copy(b[off:], v); return b }
	}
	u16 := func(off int, v uint16) func([]byte) []byte {
		return func(b []byte) []byte { put16(b, off, v); return b }
	}
	u32 := func(off int, v uint32) func([]byte) []byte {
		return func(b []byte) []byte { put32(b, off, v); return b }
	}
	u64 := func(off int, v uint64) func([]byte) []byte {
		return func(b []byte) []byte { put64(b, off, v); return b }
	}
	truncate := func(n int) func([]byte) []byte { return func(b []byte) []byte { return b[:n] } }
	runMutations(t, fixture22, []mutation{
		// §1 file size
		{"size not 4K multiple", "size", truncate(20000)},
		{"size below one block", "size", truncate(1000)},
		{"truncated before chunk table", "chunk_table_offset", truncate(16384)},
		{"truncated to superblock block", "meta_blkaddr", truncate(4096)},
		// §2 superblock
		{"magic", "magic", set(offSB, 0xe2, 0xe1, 0xf5, 0xe1)},
		{"checksum", "checksum", u32(offSB+4, 1)},
		{"compat without RAFS_V6", "feature_compat", u32(offSB+8, 0)},
		{"compat with SB_CHKSUM", "feature_compat", u32(offSB+8, 0x40000001)},
		{"blkszbits", "blkszbits", set(offSB+12, 10)},
		{"extslots", "extslots", set(offSB+13, 1)},
		{"root nid out of range", "root_nid", u16(offSB+14, 0xFFFF)},
		{"root nid is a file", "root_nid", u16(offSB+14, 133)},
		{"inos zero", "inos", u64(offSB+16, 0)},
		{"blocks without devices", "blocks", func(b []byte) []byte {
			// A bootstrap without blobs (and so without chunk-based files).
			put16(b, offSB+86, 0)
			put32(b, offExt+16, 0)
			put32(b, offSB+36, 7)
			return b
		}},
		{"meta_blkaddr past end", "meta_blkaddr", u32(offSB+40, 5)},
		{"meta_blkaddr zero", "meta_blkaddr", u32(offSB+40, 0)},
		{"xattr_blkaddr", "xattr_blkaddr", u32(offSB+44, 1)},
		{"incompat extra bit", "feature_incompat", u32(offSB+80, 0x1C)},
		{"incompat missing bit", "feature_incompat", u32(offSB+80, 0x4)},
		{"u1", "u1", u16(offSB+84, 1)},
		{"extra_devices vs blob table", "blob_table_size", u16(offSB+86, 2)},
		{"devt_slotoff", "devt_slotoff", u16(offSB+88, 12)},
		{"reserved", "reserved", set(offSB+96, 1)},
		// §3 ext superblock
		{"two compressors", "flags", u64(offExt, 0x196)},
		{"no compressor", "flags", u64(offExt, 0x114)},
		{"two digests", "flags", u64(offExt, 0x19C)},
		{"no digest", "flags", u64(offExt, 0x190)},
		{"unknown flag", "flags", u64(offExt, 0x194|0x10000)},
		{"tarfs flag with 4K blocks", "flags", u64(offExt, 0x194|FlagTarfsMode)},
		{"blob table unaligned", "blob_table_offset", u64(offExt+8, 4097)},
		{"blob table past end", "blob_table_offset", u64(offExt+8, 1<<40)},
		{"blob table in block 0", "blob_table_offset", u64(offExt+8, 0)},
		{"blob table size", "blob_table_size", u32(offExt+16, 255)},
		{"chunk size not pow2", "chunk_size", u32(offExt+20, 3<<20)},
		{"chunk size too small", "chunk_size", u32(offExt+20, 2048)},
		{"chunk size too big", "chunk_size", u32(offExt+20, 32<<20)},
		{"chunk table overlaps blob table", "chunk_table_offset", u64(offExt+24, 4096)},
		{"chunk table unaligned", "chunk_table_offset", u64(offExt+24, 16385)},
		{"chunk table size", "chunk_table_size", u64(offExt+32, 159)},
		{"chunk table size overflow", "chunk_table_offset", u64(offExt+32, 80*(1<<57))},
		{"prefetch table past end", "prefetch_table_offset", func(b []byte) []byte {
			put64(b, offExt+40, 20480)
			put32(b, offExt+48, 4)
			return b
		}},
		{"prefetch table size", "prefetch_table_size", func(b []byte) []byte {
			put64(b, offExt+40, 4096+256)
			put32(b, offExt+48, 6)
			return b
		}},
		{"prefetch table over blob table", "prefetch_table_offset", func(b []byte) []byte {
			put64(b, offExt+40, 4096)
			put32(b, offExt+48, 4)
			return b
		}},
		// §4 device slot
		{"slot blob id slash", "blob_id", set(offSlot, '/')},
		{"slot blob id differs", "blob_id", set(offSlot, 'a')},
		{"slot blocks", "blocks", func(b []byte) []byte {
			put32(b, offSlot+64, 10)
			put32(b, offSB+36, 10)
			return b
		}},
		{"slot reserved", "reserved", set(offSlot+74, 1)},
		// §5 blob table
		{"blob id dotdot", "blob_id", func(b []byte) []byte {
			clear(b[offBlob : offBlob+64])
			copy(b[offBlob:], "..")
			return b
		}},
		{"blob id NUL inside", "blob_id", set(offBlob+10, 0)},
		{"blob index", "blob_index", u32(offBlob+64, 1)},
		{"blob chunk size", "chunk_size", u32(offBlob+68, 1<<21)},
		{"chunk count", "chunk_count", u32(offBlob+72, 1<<25)},
		{"compressor", "compression", u32(offBlob+76, 9)},
		{"digester", "digester", u32(offBlob+80, 5)},
		{"unknown incompat feature", "features", u32(offBlob+84, 0x70000021|0x1000)},
		{"feature bit 31", "features", u32(offBlob+84, 0xF0000021)},
		{"not ALIGNED", "features", u32(offBlob+84, 0x70000020)},
		{"zran without v2", "features", u32(offBlob+84, 0x70000021|BlobFeatureZran)},
		{"compressed size", "compressed_size", u64(offBlob+88, 1<<41)},
		{"uncompressed size", "uncompressed_size", u64(offBlob+96, 1<<45)},
		{"ci compressor", "ci_compressor", u32(offBlob+108, 7)},
		{"ci offset overflow", "ci_offset", u64(offBlob+112, 1<<64-8)},
		{"ci compressed > uncompressed", "ci_compressed_size", u64(offBlob+120, 33)},
		{"ci uncompressed size", "ci_uncompressed_size", func(b []byte) []byte {
			put64(b, offBlob+120, 48)
			put64(b, offBlob+128, 48)
			return b
		}},
		{"cipher", "cipher", u32(offBlob+216, 7)},
		// §10 chunk table
		{"chunk table blob index", "blob_index", u32(offChunkTbl+32, 3)},
		{"chunk table ci index", "index", u32(offChunkTbl+72, 9)},
		{"chunk table offset past blob", "uncompressed_offset", u64(offChunkTbl+56, 36000)},
		// §6 inodes
		{"root layout 7", "i_format", u16(offRoot, 0x0F)},
		{"root unknown format bits", "i_format", u16(offRoot, 0x0105)},
		{"root mode type 0", "i_mode", u16(offRoot+4, 0o755)},
		{"root as regular file with inline data", "i_format", u16(offRoot+4, 0o100755)},
		{"root tail crosses block", "i_size", u64(offRoot+8, 4040)},
		{"root size past bootstrap", "i_size", u64(offRoot+8, 1<<40)},
		{"root size zero", "i_size", u64(offRoot+8, 0)},
		{"root full blocks past end", "i_u", func(b []byte) []byte {
			put64(b, offRoot+8, 4096+67)
			put32(b, offRoot+16, 5)
			return b
		}},
		{"file mode type unknown", "i_mode", u16(offLibRs+4, 0o170644)},
		// §8 chunk-based files
		{"chunk format 48-bit", "i_u", u32(offLibRs+16, 0x68)},
		{"chunk format without indexes", "i_u", u32(offLibRs+16, 0x08)},
		{"chunk format high bits", "i_u", u32(offLibRs+16, 0x10028)},
		{"chunk count overflow", "i_size", u64(offLibRs+8, 1<<62)},
		{"chunk count max size", "i_size", u64(offLibRs+8, 1<<64-1)},
		{"file regular non-chunk with data", "i_format", u16(offLibRs, 0x1)},
		{"chunk device 0", "chunk 0 device_id", u16(offLibRsIdx+2, 0)},
		{"chunk device out of range", "chunk 0 device_id", u16(offLibRsIdx+2, 5)},
		{"chunk ci index", "chunk 0 ci index", u16(offLibRsIdx, 7)},
		{"chunk ci index high byte", "chunk 0 ci index", u16(offLibRsIdx+2, 0x0101)},
		{"chunk blkaddr past blob", "chunk 0 blkaddr", u32(offLibRsIdx+4, 9)},
		{"chunk blkaddr overflow", "chunk 0 blkaddr", u32(offLibRsIdx+4, 0xFFFFFFFE)},
		// §9 xattrs
		{"xattr area over chunk index", "xattr e_name_index", u16(offLibRs+2, 2)},
		{"xattr shared count", "xattr h_shared_count", func(b []byte) []byte {
			put16(b, offLibRs+2, 1)
			b[offLibRsIdx+4] = 1 // h_shared_count is byte 4 of the area
			return b
		}},
		{"xattr area past bootstrap", "xattrs", func(b []byte) []byte {
			put16(b, offLibRs+2, 0xFFFF)
			return b
		}},
		// §7 directories
		{"dot points elsewhere", "nid", u64(offRootData, 133)},
		{"dotdot points to a file", "..", u64(offRootData+12, 133)},
		{"dotdot not a dir type", "file_type", set(offRootData+12+10, 1)},
		{"first nameoff not multiple of 12", "nameoff", u16(offRootData+8, 47)},
		{"first nameoff past block", "nameoff", u16(offRootData+8, 96)},
		{"nameoff out of order", "nameoff", u16(offRootData+24+8, 49)},
		{"nameoff past end", "nameoff", u16(offRootData+36+8, 200)},
		{"name with slash", "name", set(offRootData+51, '/')},
		{"name with NUL", "name", set(offRootData+52, 0)},
		{"names unsorted", "name", set(offRootData+57, 'a')},
		{"duplicate dot", "name", set(offRootData+50, 0)},
		{"unknown file type", "file_type", set(offRootData+24+10, 9)},
		{"file type mismatch", "file_type", set(offRootData+24+10, FileTypeSymlink)},
		{"dirent nid out of range", "nid", u64(offRootData+24, 1<<40)},
		{"dirent nid in chunk table", "i_format", u64(offRootData+24, (16384-8192)/32)},
		{"directory cycle", "nid", func(b []byte) []byte {
			put64(b, offRootData+24, 128) // lib.rs -> root
			b[offRootData+24+10] = FileTypeDir
			return b
		}},
	})
}

func TestMutationsSnapshotter(t *testing.T) {
	const offBin = 8192 + 142*32 // /bin, a symlink to usr/bin
	runMutations(t, fixtureSnap, []mutation{
		{"symlink too long", "i_size", func(b []byte) []byte { put64(b, offBin+8, 5000); return b }},
		{"symlink empty", "i_size", func(b []byte) []byte { put64(b, offBin+8, 0); return b }},
		{"symlink with NUL", "i_size", func(b []byte) []byte {
			// The inline target follows the 64-byte inode.
			b[offBin+64+2] = 0
			return b
		}},
		{"symlink chunk-based", "i_format", func(b []byte) []byte { put16(b, offBin, 0x9); return b }},
		{"prefetch table size", "prefetch_table_size", func(b []byte) []byte { put32(b, offExt+48, 5); return b }},
	})
}

// Reading through a failing reader surfaces the I/O error, wrapped.
func TestReaderErrors(t *testing.T) {
	orig, err := os.ReadFile(testutil.NydusFixture(t, fixture22))
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	r := &failingReader{data: orig, failAt: 12288, err: boom}
	img, err := NewImage(r, int64(len(orig)))
	if err == nil {
		err = img.Walk(func(string, *Entry) error { return nil })
	}
	if !errors.Is(err, boom) {
		t.Errorf("got %v, want the reader's error", err)
	}
	// A reader shorter than the size it claims.
	_, err = NewImage(bytes.NewReader(orig[:8192]), int64(len(orig)))
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short reader: %v", err)
	}
}

type failingReader struct {
	data   []byte
	failAt int64
	err    error
}

func (f *failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.failAt {
		return 0, f.err
	}
	return copy(p, f.data[off:]), nil
}

// What nydus tolerates, the reader tolerates too.
func TestToleratedQuirks(t *testing.T) {
	orig, err := os.ReadFile(testutil.NydusFixture(t, fixture22))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []struct {
		name string
		edit func(b []byte)
		test func(t *testing.T, img *Image)
	}{
		{"blocks not the sum of the slots", func(b []byte) { put32(b, offSB+36, 12345) }, nil},
		{"legacy prefetch size with offset 0", func(b []byte) { put32(b, offExt+48, 8) }, func(t *testing.T, img *Image) {
			if img.PrefetchTable != nil {
				t.Errorf("prefetch table %v, want none", img.PrefetchTable)
			}
		}},
		{"mapped_blkaddr 0", func(b []byte) { put32(b, offSlot+68, 0) }, nil},
		{"other compat bits", func(b []byte) { put32(b, offSB+8, FeatureCompatRafsV6|0x2) }, nil},
		{"build time for compact inodes", func(b []byte) { put64(b, offSB+24, 1234) }, nil},
		{"hole chunk", func(b []byte) { put32(b, offLibRsIdx+4, NullBlkAddr) }, func(t *testing.T, img *Image) {
			e, err := img.Lookup("/lib.rs")
			if err != nil {
				t.Fatal(err)
			}
			exts, err := img.FileExtents(e)
			if err != nil || len(exts) != 1 || exts[0].Blob != -1 || exts[0].Length != 16931 {
				t.Errorf("extents of a hole chunk: %+v, %v", exts, err)
			}
			data, err := fs.ReadFile(img.FS(nil), "lib.rs")
			if err != nil || len(data) != 16931 || !allZero(data) {
				t.Errorf("hole reads %d bytes, %v; want 16931 zeros", len(data), err)
			}
		}},
	} {
		t.Run(q.name, func(t *testing.T) {
			b := bytes.Clone(orig)
			q.edit(b)
			if err := checkAll(b); err != nil {
				t.Fatal(err)
			}
			if q.test != nil {
				img, err := NewImage(bytes.NewReader(b), int64(len(b)))
				if err != nil {
					t.Fatal(err)
				}
				q.test(t, img)
			}
		})
	}
}
