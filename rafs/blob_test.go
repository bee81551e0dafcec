package rafs

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"reflect"
	"testing"
	"testing/fstest"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

const (
	fixture22UncompressedSHA = "66c3387eb172d604c659d25771cf8979953613d89970f66264d435dbbc17c763"
	libRsSHA                 = "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69"
	syncIoRsSHA              = "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96"
)

func fixture22BlobBytes(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(testutil.NydusFixture(t, fixture22Blob))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadBlobChunksFixture(t *testing.T) {
	img := openFixture(t, fixture22)
	blob := fixture22BlobBytes(t)
	chunks, err := ReadBlobChunks(bytes.NewReader(blob), &img.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	want := []BlobChunk{
		{CompressedOffset: 0, CompressedSize: 4828, UncompressedOffset: 0, UncompressedSize: 16931, Flags: ChunkFlagCompressed},
		{CompressedOffset: 4828, CompressedSize: 2974, UncompressedOffset: 20480, UncompressedSize: 13400, Flags: ChunkFlagCompressed},
	}
	if !reflect.DeepEqual(chunks, want) {
		t.Errorf("chunks %+v\nwant %+v", chunks, want)
	}
	// The bootstrap chunk table agrees with the blob's own ci array.
	for _, c := range img.ChunkTable {
		bc := chunks[c.Index]
		if c.CompressedOffset != bc.CompressedOffset || c.CompressedSize != bc.CompressedSize ||
			c.UncompressedOffset != bc.UncompressedOffset || c.UncompressedSize != bc.UncompressedSize {
			t.Errorf("chunk table entry %+v disagrees with ci[%d] %+v", c, c.Index, bc)
		}
	}
}

// uncompressedSpace lays blob's chunks out decompressed at their
// uncompressed offsets, zeros between them, cut at limit bytes: the
// reference the tests read files through. (The product serves a blob's
// uncompressed space through package blobcache, which also checks every
// chunk's digest; rafs only decodes.)
func uncompressedSpace(blob []byte, e *BlobEntry, chunks []BlobChunk, limit int64) ([]byte, error) {
	space := make([]byte, min(e.UncompressedSize, uint64(limit)))
	for i, c := range chunks {
		if c.UncompressedOffset >= uint64(len(space)) {
			continue
		}
		if c.CompressedOffset+uint64(c.CompressedSize) > uint64(len(blob)) {
			return nil, fmt.Errorf("chunk %d: stored bytes past the blob's %d", i, len(blob))
		}
		stored := blob[c.CompressedOffset : c.CompressedOffset+uint64(c.CompressedSize)]
		plain := stored
		if c.Compressed() {
			plain = make([]byte, c.UncompressedSize)
			if err := Decompress(e.Compressor, plain, stored); err != nil {
				return nil, fmt.Errorf("chunk %d: %w", i, err)
			}
		}
		copy(space[c.UncompressedOffset:], plain)
	}
	return space, nil
}

func fixture22Uncompressed(t testing.TB) (*Image, *bytes.Reader) {
	img := openFixture(t, fixture22)
	blob := fixture22BlobBytes(t)
	chunks, err := ReadBlobChunks(bytes.NewReader(blob), &img.Blobs[0])
	if err != nil {
		t.Fatal(err)
	}
	space, err := uncompressedSpace(blob, &img.Blobs[0], chunks, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	return img, bytes.NewReader(space)
}

func TestFixture22UncompressedSpace(t *testing.T) {
	_, ur := fixture22Uncompressed(t)
	if ur.Size() != 36864 {
		t.Fatalf("Size = %d", ur.Size())
	}
	all := make([]byte, ur.Size())
	if n, err := ur.ReadAt(all, 0); n != len(all) || err != nil {
		t.Fatalf("ReadAt all = %d, %v", n, err)
	}
	if sum := sha256.Sum256(all); hex.EncodeToString(sum[:]) != fixture22UncompressedSHA {
		t.Errorf("sha256 of uncompressed space %x, want %s", sum, fixture22UncompressedSHA)
	}
	// Gaps between chunks and after the last one are zero.
	if !allZero(all[16931:20480]) || !allZero(all[20480+13400:]) {
		t.Error("gaps are not zero")
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func TestFSFixture22(t *testing.T) {
	img, ur := fixture22Uncompressed(t)
	fsys := img.FS([]io.ReaderAt{ur})
	for name, want := range map[string]string{"lib.rs": libRsSHA, "sync_io.rs": syncIoRsSHA} {
		data, err := fs.ReadFile(fsys, name)
		if err != nil {
			t.Fatal(err)
		}
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != want {
			t.Errorf("%s sha256 %x, want %s", name, sum, want)
		}
		if !bytes.HasPrefix(data, []byte("// Copyright (C) 2020 Alibaba Cloud.")) {
			t.Errorf("%s starts with %q", name, data[:40])
		}
	}
	if err := fstest.TestFS(fsys, "lib.rs", "sync_io.rs"); err != nil {
		t.Fatal(err)
	}
	fi, err := fs.Stat(fsys, "lib.rs")
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := fi.Sys().(*Entry); !ok || e.Nid != 133 || fi.Size() != 16931 || fi.Mode() != 0o644 ||
		fi.ModTime().Unix() != 1676819553 || fi.ModTime().Nanosecond() != 628661334 {
		t.Errorf("Stat(lib.rs) = %v %v %v %v", fi.Sys(), fi.Size(), fi.Mode(), fi.ModTime())
	}
	if fi, err := fs.Stat(fsys, "."); err != nil || !fi.IsDir() || fi.Mode() != fs.ModeDir|0o755 {
		t.Errorf("Stat(.) = %v, %v", fi, err)
	}
	// Without blob readers the tree lists but file data cannot be read.
	bare := img.FS(nil)
	if ents, err := fs.ReadDir(bare, "."); err != nil || len(ents) != 2 {
		t.Errorf("ReadDir without blobs = %v, %v", ents, err)
	}
	if _, err := fs.ReadFile(bare, "lib.rs"); err == nil {
		t.Error("ReadFile without a blob reader succeeded")
	}
	for _, bad := range []string{"/lib.rs", "../x", "lib.rs/", ""} {
		if _, err := fsys.Open(bad); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Open(%q) error %v, want fs.ErrInvalid", bad, err)
		}
	}
	if _, err := fsys.Open("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open(missing) error %v", err)
	}
}

// zeroBlob serves size zero bytes, standing in for a blob that is not
// available (the snapshotter fixture's).
type zeroBlob struct{ size int64 }

func (z zeroBlob) ReadAt(p []byte, off int64) (int, error) {
	if off >= z.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), z.size-off))
	clear(p[:n])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func TestFSSnapshotterFixture(t *testing.T) {
	testutil.SkipShort(t)
	img := openFixture(t, fixtureSnap)
	fsys := img.FS([]io.ReaderAt{zeroBlob{int64(img.Blobs[0].UncompressedSize)}})
	if err := fstest.TestFS(fsys, "usr/bin/bash", "bin", "etc/passwd"); err != nil {
		t.Fatal(err)
	}
	target, err := fs.ReadLink(fsys, "bin")
	if err != nil || target != "usr/bin" {
		t.Errorf("ReadLink(bin) = %q, %v", target, err)
	}
	fi, err := fs.Lstat(fsys, "bin")
	if err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Errorf("Lstat(bin) = %v, %v", fi, err)
	}
	data, err := fs.ReadFile(fsys, "bin/bash")
	if err != nil || len(data) != 1396520 || !allZero(data) {
		t.Errorf("ReadFile(bin/bash) = %d bytes, %v", len(data), err)
	}
}

func TestBlobChunkMutations(t *testing.T) {
	img := openFixture(t, fixture22)
	orig := fixture22BlobBytes(t)
	const ci, hdr = 8314, 8314 + 32
	entry := func(f func(e *BlobEntry)) func(*BlobEntry) { return f }
	for _, m := range []struct {
		name  string
		field string
		blob  func(b []byte) []byte
		entry func(e *BlobEntry)
	}{
		{"header magic", "magic", func(b []byte) []byte { b[hdr] ^= 1; return b }, nil},
		{"header magic2", "magic2", func(b []byte) []byte { b[hdr+4092] ^= 1; return b }, nil},
		{"header features", "features", func(b []byte) []byte { put32(b, hdr+4, 0x70000025); return b }, nil},
		{"header ci compressor", "ci_compressor", func(b []byte) []byte { put32(b, hdr+8, 3); return b }, nil},
		{"header ci entries", "ci_entries", func(b []byte) []byte { put32(b, hdr+12, 3); return b }, nil},
		{"header ci offset", "ci_offset", func(b []byte) []byte { put64(b, hdr+16, 8000); return b }, nil},
		{"header ci compressed size", "ci_compressed_size", func(b []byte) []byte { put64(b, hdr+24, 31); return b }, nil},
		{"header ci uncompressed size", "ci_uncompressed_size", func(b []byte) []byte { put64(b, hdr+32, 31); return b }, nil},
		{"truncated header", "blob meta header", func(b []byte) []byte { return b[:hdr+100] }, nil},
		// ci[1] (U at ci+16, C at ci+24): overlapping, past the end, raw with differing sizes.
		{"chunk overlaps previous", "chunk 1 uncompressed offset", func(b []byte) []byte {
			u := binary.LittleEndian.Uint64(b[ci+16:])
			put64(b, ci+16, u&^0xFFF_FFFF_F000|0x1000)
			return b
		}, nil},
		{"chunk past uncompressed size", "chunk 1 uncompressed offset", func(b []byte) []byte {
			u := binary.LittleEndian.Uint64(b[ci+16:])
			put64(b, ci+16, u&^0xFFF_FFFF_F000|0x8000)
			return b
		}, nil},
		{"chunk past compressed size", "chunk 1 compressed offset", func(b []byte) []byte {
			c := binary.LittleEndian.Uint64(b[ci+24:])
			put64(b, ci+24, c&^0xFF_FFFF_FFFF|14000)
			return b
		}, nil},
		{"entry ci compressor mismatch", "ci_compressor", nil, entry(func(e *BlobEntry) { e.CICompressor = CompressZstd })},
		{"entry ci size not chunk count", "ci_uncompressed_size", nil, entry(func(e *BlobEntry) { e.ChunkCount = 3 })},
		{"entry ci offset overflow", "ci_offset", nil, entry(func(e *BlobEntry) { e.CIOffset = 1<<64 - 1 })},
		{"uncompressed size smaller than chunks", "chunk 1 uncompressed offset", nil, entry(func(e *BlobEntry) { e.UncompressedSize = 32768 })},
		{"chunk bigger than chunk size", "chunk 0 uncompressed size", nil, entry(func(e *BlobEntry) { e.ChunkSize = 16384 })},
	} {
		t.Run(m.name, func(t *testing.T) {
			b := bytes.Clone(orig)
			if m.blob != nil {
				b = m.blob(b)
			}
			e := img.Blobs[0]
			if m.entry != nil {
				m.entry(&e)
			}
			_, err := ReadBlobChunks(bytes.NewReader(b), &e)
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("got %v, want a FormatError for %q", err, m.field)
			}
			if fe.Field != m.field {
				t.Errorf("field %q, want %q (%v)", fe.Field, m.field, err)
			}
		})
	}
	// Unsupported chunk kinds are reported as such, not as corruption.
	e := img.Blobs[0]
	e.Features |= BlobFeatureZran | BlobFeatureChunkInfoV2
	if _, err := ReadBlobChunks(bytes.NewReader(orig), &e); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("zran blob: %v, want errors.ErrUnsupported", err)
	}
	// A tarfs blob has no chunk info.
	e = img.Blobs[0]
	e.Features = BlobFeatureTarfs | BlobFeatureCapTarTOC
	if chunks, err := ReadBlobChunks(bytes.NewReader(orig), &e); chunks != nil || err != nil {
		t.Errorf("tarfs blob: %v, %v", chunks, err)
	}
}

type syntheticBlob struct {
	name  string
	entry BlobEntry
	blob  []byte
	space []byte // the expected uncompressed space
}

// makeBlob lays out a non-tarfs blob as nydus does (§11): chunks
// compressed back to back, the ci array (v1 or v2, compressed with
// ciComp), then the 4 KiB blob meta header.
func makeBlob(name string, comp, ciComp Compressor, v2 bool, datas [][]byte) (syntheticBlob, error) {
	var blob, ci []byte
	var uoff uint64
	var space []byte
	for _, d := range datas {
		stored, err := Compress(comp, nil, d)
		compressed := err == nil && comp != CompressNone
		if errors.Is(err, ErrNotSmaller) {
			stored = d
		} else if err != nil {
			return syntheticBlob{}, err
		}
		c := BlobChunk{CompressedOffset: uint64(len(blob)), CompressedSize: uint32(len(stored)),
			UncompressedOffset: uoff, UncompressedSize: uint32(len(d))}
		blob = append(blob, stored...)
		if v2 {
			var flags uint64
			if compressed {
				flags = ChunkFlagCompressed
			}
			var b [CIv2EntrySize]byte
			binary.LittleEndian.PutUint64(b[0:], uoff>>12|uint64(len(d)-1)<<32|flags<<56)
			binary.LittleEndian.PutUint64(b[8:], c.CompressedOffset|uint64(c.CompressedSize)<<40)
			ci = append(ci, b[:]...)
		} else {
			var b [CIv1EntrySize]byte
			if err := EncodeCIv1(b[:], c); err != nil {
				return syntheticBlob{}, err
			}
			ci = append(ci, b[:]...)
		}
		space = append(space, d...)
		uoff = (uoff + uint64(len(d)) + 4095) &^ 4095
		space = append(space, make([]byte, int(uoff)-len(space))...)
	}
	packed := ci
	if ciComp != CompressNone {
		var err error
		if packed, err = Compress(ciComp, nil, ci); err != nil {
			return syntheticBlob{}, err
		}
	}
	ciOff := uint64(len(blob))
	blob = append(blob, packed...)
	features := uint32(BlobFeatureAligned)
	if v2 {
		features |= BlobFeatureChunkInfoV2
	}
	h := BlobMetaHeader{Magic: BlobMetaMagic, Magic2: BlobMetaMagic, Features: features, CICompressor: ciComp,
		CIEntries: uint32(len(datas)), CIOffset: ciOff, CICompressedSize: uint64(len(packed)), CIUncompressedSize: uint64(len(ci))}
	var hb [BlobMetaHeaderSize]byte
	h.Encode(hb[:])
	blob = append(blob, hb[:]...)
	e := BlobEntry{ChunkSize: 1 << 20, ChunkCount: uint32(len(datas)), Compressor: comp, Features: features,
		CompressedSize: uint64(len(blob)), UncompressedSize: uoff, CICompressor: ciComp, CIOffset: ciOff,
		CICompressedSize: uint64(len(packed)), CIUncompressedSize: uint64(len(ci))}
	copy(e.BlobID[:], "synthetic-"+name)
	return syntheticBlob{name, e, blob, space}, nil
}

func syntheticBlobs() []syntheticBlob {
	text := bytes.Repeat([]byte("chunk data compresses well. "), 300)
	random := make([]byte, 5000)
	for i := range random {
		random[i] = byte(i*7919 + i*i*31)
	}
	datas := [][]byte{text[:8000], random, {42}, text[:4096], bytes.Repeat([]byte{0}, 70000)}
	var out []syntheticBlob
	for _, tc := range []struct {
		comp, ciComp Compressor
		v2           bool
	}{
		{CompressZstd, CompressNone, false},
		{CompressLZ4Block, CompressLZ4Block, false},
		{CompressGzip, CompressZstd, true},
		{CompressNone, CompressNone, true},
		{CompressLZ4Block, CompressGzip, true},
	} {
		sb, err := makeBlob(tc.comp.String()+"-"+tc.ciComp.String(), tc.comp, tc.ciComp, tc.v2, datas)
		if err != nil {
			panic(err) // constant inputs: cannot happen
		}
		out = append(out, sb)
	}
	return out
}

// Every compressor, ci compressor and ci version round-trips through
// ReadBlobChunks and decompression.
func TestSyntheticBlobs(t *testing.T) {
	for _, sb := range syntheticBlobs() {
		t.Run(sb.name, func(t *testing.T) {
			chunks, err := ReadBlobChunks(bytes.NewReader(sb.blob), &sb.entry)
			if err != nil {
				t.Fatal(err)
			}
			if len(chunks) != 5 {
				t.Fatalf("%d chunks", len(chunks))
			}
			got, err := uncompressedSpace(sb.blob, &sb.entry, chunks, 1<<30)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, sb.space) {
				t.Error("uncompressed space differs")
			}
		})
	}
}
