package rafs

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// fuzzFixture returns a fixture's bytes, or nil when the shared fixtures
// are not beside the repository (the kept corpus in testdata/fuzz still
// runs then).
func fuzzFixture(f *testing.F, name string) []byte {
	p := filepath.Join(testutil.RepoRoot(f), "..", "shared", "fixtures", "nydus", name)
	b, err := os.ReadFile(p)
	if err != nil {
		f.Logf("fuzz seed %s not available: %v", name, err)
		return nil
	}
	return b
}

// fuzzing reports whether this run is generating inputs (-fuzz) rather
// than replaying the seed corpus.
func fuzzing() bool {
	fl := flag.Lookup("test.fuzz")
	return fl != nil && fl.Value.String() != ""
}

// Limits that keep one fuzz execution fast whatever sizes the input claims.
const (
	fuzzMaxFileRead = 1 << 20
	fuzzMaxFSFiles  = 2000
)

func FuzzOpen(f *testing.F) {
	if b := fuzzFixture(f, fixture22); b != nil {
		f.Add(b)
		// A few structural mutations, so that the fuzzer starts next to
		// the interesting checks.
		for _, edit := range []func([]byte){
			func(b []byte) { put64(b, offRootData+24, 128); b[offRootData+24+10] = FileTypeDir }, // cycle
			func(b []byte) { put64(b, offLibRs+8, 1<<62) },                                       // chunk count overflow
			func(b []byte) { put16(b, offLibRs+2, 3) },                                           // xattrs over chunk index
			func(b []byte) { put16(b, offRootData+24+8, 49) },                                    // nameoff order
			func(b []byte) { put64(b, offRoot+8, 4096+67); put32(b, offRoot+16, 4) },             // multi-block dir
			func(b []byte) { put32(b, offLibRs+16, 0x20) },                                       // 4 KiB chunks: 5 indexes
			func(b []byte) { put32(b, offLibRsIdx+4, NullBlkAddr) },                              // hole chunk
		} {
			m := bytes.Clone(b)
			edit(m)
			f.Add(m)
		}
	}
	// Synthetic images reach what the fixtures lack: xattrs, compact
	// inodes, special files, hard links, plain and multi-block
	// directories, 512-byte tarfs blocks.
	small := synthTree()[:16]
	for i := range 12 {
		small = append(small, synthNode{path: fmt.Sprintf("many/f%02d", i), mode: ModeRegular | 0o644, data: []byte{byte(i)}})
	}
	for _, opts := range []synthOpts{{chunkBits: 0}, {chunkBits: 2, inlineDirs: true}, {tarfs: true, chunkBits: 1}, {tarfs: true, inlineDirs: true}} {
		boot, _ := buildSynth(f, opts, small)
		f.Add(boot)
	}
	// The 628 KiB snapshotter image is a seed when the seed corpus runs
	// (go test -run=Fuzz), but not while fuzzing: the engine's input
	// minimisation on an input that large takes minutes per find.
	if !fuzzing() {
		if b := fuzzFixture(f, fixtureSnap); b != nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img, err := NewImage(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			requireFormatError(t, err)
			return
		}
		blobs := make([]io.ReaderAt, len(img.Blobs))
		for i := range img.Blobs {
			blobs[i] = zeroBlob{int64(img.Blobs[i].UncompressedSize)}
		}
		fsys := img.FS(blobs)
		files := 0
		err = img.Walk(func(p string, e *Entry) error {
			if files++; files > fuzzMaxFSFiles {
				return fs.SkipAll
			}
			name := "."
			if p != "/" {
				name = p[1:]
			}
			if !fs.ValidPath(name) {
				// io/fs paths are UTF-8; Linux names need not be. Such an
				// entry (and what is below it) is listed but cannot be
				// opened through io/fs.
				return nil
			}
			// Walk has validated every directory on the way to p, so
			// resolving p again must succeed and land on the same inode.
			fi, err := fs.Stat(fsys, name)
			if err != nil {
				t.Fatalf("%s: Stat after Walk: %v", p, err)
			}
			if fi.Sys().(*Entry).Nid != e.Nid {
				t.Fatalf("%s: Stat nid %d, Walk nid %d", p, fi.Sys().(*Entry).Nid, e.Nid)
			}
			switch {
			case e.IsDir():
				if _, err := fs.ReadDir(fsys, name); err != nil {
					requireFormatError(t, err)
				}
			case e.IsRegular():
				readFuzzFile(t, fsys, name, e)
			}
			return nil
		})
		if err != nil {
			requireFormatError(t, err)
		}
	})
}

func readFuzzFile(t *testing.T, fsys fs.FS, name string, e *Entry) {
	f, err := fsys.Open(name)
	if err != nil {
		requireFormatError(t, err)
		return
	}
	defer f.Close()
	ra := f.(io.ReaderAt)
	if e.Size <= fuzzMaxFileRead {
		buf := make([]byte, e.Size+1)
		n, err := ra.ReadAt(buf, 0)
		if err != io.EOF || uint64(n) != e.Size {
			t.Fatalf("%s: ReadAt of %d-byte file = %d, %v", name, e.Size, n, err)
		}
		if !allZero(buf) {
			t.Fatalf("%s: non-zero bytes from zero blobs", name)
		}
		return
	}
	// Large (claimed) sizes: read the two ends only.
	buf := make([]byte, 4096)
	if n, err := ra.ReadAt(buf, 0); n != len(buf) || err != nil {
		t.Fatalf("%s: ReadAt head = %d, %v", name, n, err)
	}
	if n, err := ra.ReadAt(buf, int64(e.Size)-100); n != 100 || err != io.EOF {
		t.Fatalf("%s: ReadAt tail = %d, %v", name, n, err)
	}
}

// requireFormatError fails unless err comes from a *FormatError (or is a
// lookup miss): on in-memory input no other error is possible.
func requireFormatError(t *testing.T, err error) {
	t.Helper()
	var fe *FormatError
	if errors.As(err, &fe) || errors.Is(err, fs.ErrNotExist) {
		return
	}
	t.Fatalf("error is not a FormatError: %v", err)
}

func FuzzBlobChunks(f *testing.F) {
	if boot, blob := fuzzFixture(f, fixture22), fuzzFixture(f, fixture22Blob); boot != nil && blob != nil {
		f.Add(boot[offBlob:offBlob+BlobEntrySize], blob)
	}
	for _, sb := range syntheticBlobs() {
		var ent [BlobEntrySize]byte
		sb.entry.Encode(ent[:])
		f.Add(ent[:], sb.blob)
		// An uncompressed size past 1<<63 (found by the fuzzer: it once
		// turned negative on the way to make).
		huge := sb.entry
		huge.UncompressedSize |= 1 << 63
		huge.Encode(ent[:])
		f.Add(ent[:], sb.blob)
	}
	f.Fuzz(func(t *testing.T, entry, blob []byte) {
		if len(entry) < BlobEntrySize {
			entry = append(entry, make([]byte, BlobEntrySize-len(entry))...)
		}
		var e BlobEntry
		e.Decode(entry)
		// Keep one execution cheap: real ci arrays reach 384 MiB, but a
		// fuzzer-made size that large only measures the allocator.
		if e.CIUncompressedSize > 1<<20 {
			return
		}
		chunks, err := ReadBlobChunks(bytes.NewReader(blob), &e)
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) && !errors.Is(err, errors.ErrUnsupported) {
				t.Fatalf("error is neither a FormatError nor unsupported: %v", err)
			}
			return
		}
		var prevEnd uint64
		for i, c := range chunks {
			end := c.UncompressedOffset + uint64(c.UncompressedSize)
			if c.UncompressedOffset < prevEnd || end > e.UncompressedSize || c.UncompressedSize > MaxChunkSize ||
				c.CompressedOffset+uint64(c.CompressedSize) > e.CompressedSize {
				t.Fatalf("chunk %d %+v escapes validation (entry %+v)", i, c, e)
			}
			prevEnd = end
		}
		// Decoded chunks decompress or fail; never a panic.
		_, _ = uncompressedSpace(blob, &e, chunks, 1<<20)
	})
}
