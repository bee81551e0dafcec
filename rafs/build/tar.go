package build

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"

	"golang.org/x/sync/errgroup"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// tarfsBlockSize is the EROFS block size of tarfs images: tar's own.
const tarfsBlockSize = 512

const pageSize = 4096

// FromTar builds a tarfs image of the tar read through r: the tar itself
// becomes the blob (copied, reflinked or hard-linked into opts.BlobDir as
// <sha256 of the tar>, or opts.BlobID) and the bootstrap, written to
// bootstrap, points at file data inside it. Only headers are read to index
// the tar; file data is skipped by seeking. r's size comes from a Size or
// Stat method, or from seeking to its end. A gzip or zstd stream (told by
// its magic bytes) is decompressed into opts.BlobDir first: the blob is the
// uncompressed tar, named by its sha256 (opts.BlobID must be that sha256).
//
// Entries are applied as OCI layer extraction does: leading "/" and "./"
// are dropped, names that climb above the root are an error, missing parent
// directories appear with mode 0755, and a later entry replaces an earlier
// one of the same name (a directory over a directory only updates its
// metadata). Symlink targets are stored verbatim. Hard links must name an
// earlier entry. Whiteout files (.wh.*) are ordinary files here, except
// that one beneath a non-directory of the same tar is dropped (see
// applyTarEntry).
func FromTar(ctx context.Context, r io.ReaderAt, bootstrap io.Writer, opts Options) (*Result, error) {
	if err := opts.normalize(); err != nil {
		return nil, err
	}
	size, err := readerSize(r)
	if err != nil {
		return nil, err
	}
	if opts.BlobID != "" {
		id, ok := strings.CutPrefix(opts.BlobID, "sha256:")
		if !ok {
			id = opts.BlobID
		}
		if !isHex64(id) {
			return nil, fmt.Errorf("build: blob id %q is not 64 lowercase hex digits", opts.BlobID)
		}
		opts.BlobID = id
	}

	var (
		tree   *pathTree
		placed *placedTar
	)
	// The blob takes its name only once the bootstrap is written; until
	// then a failure removes it, so that a failed build leaves nothing
	// behind (nor a blob that no bootstrap names).
	committed := false
	defer func() {
		if placed != nil && !committed {
			os.Remove(placed.tmp)
		}
	}()
	comp, err := DetectCompression(r, size)
	if err != nil {
		return nil, err
	}
	if comp != Uncompressed {
		// The blob is the uncompressed tar: decompress it into place
		// first, then index that.
		if placed, size, err = decompressTar(ctx, r, size, comp, &opts); err != nil {
			return nil, err
		}
		f, err := os.Open(placed.tmp)
		if err != nil {
			return nil, fmt.Errorf("build: %w", err)
		}
		defer f.Close()
		r = f
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() (err error) {
		tree, err = indexTar(gctx, r, size)
		return err
	})
	if placed == nil {
		g.Go(func() (err error) {
			placed, err = placeTar(gctx, r, size, &opts)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}

	chunk := uint64(opts.ChunkSize)
	var infos []rafs.ChunkInfo
	root, err := toNodes(tree.root, func(in *inode, n *rafs.Node) error {
		for k := uint64(0); k*chunk < n.Size; k++ {
			off := uint64(in.dataOff) + k*chunk
			ci := uint32(len(infos))
			if ci > rafs.MaxCIIndex {
				return fmt.Errorf("build: more than 2^24 chunks in one tar")
			}
			n.Chunks = append(n.Chunks, rafs.NewChunkIndex(0, ci, uint32(off/tarfsBlockSize)))
			length := uint32(min(chunk, n.Size-k*chunk))
			infos = append(infos, rafs.ChunkInfo{
				CompressedSize:     length,
				UncompressedSize:   length,
				CompressedOffset:   off,
				UncompressedOffset: off,
				FileOffset:         k * chunk,
				Index:              ci,
			})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	info := rafs.BlobInfo{
		ID: placed.id,
		Entry: rafs.BlobEntry{
			ChunkCount:       uint32(len(infos)),
			Compressor:       rafs.CompressNone,
			Digester:         rafs.DigestSHA256,
			Features:         rafs.BlobFeatureTarfs | rafs.BlobFeatureCapTarTOC,
			CompressedSize:   uint64(size),
			UncompressedSize: uint64(size),
			CICompressor:     rafs.CompressNone,
		},
		Chunks: infos,
	}
	wres, err := rafs.WriteBootstrap(bootstrap, root, []rafs.BlobInfo{info}, rafs.WriteOptions{
		BlockSizeBits: rafs.BlockSizeBitsTarfs,
		ChunkSize:     opts.ChunkSize,
		Compressor:    rafs.CompressNone,
		Digester:      rafs.DigestSHA256,
		Tarfs:         true,
	})
	if err != nil {
		return nil, err
	}
	blobPath, err := placed.commit()
	if err != nil {
		return nil, err
	}
	committed = true
	return &Result{
		Bootstrap: wres,
		Blobs: []Blob{{
			ID: placed.id, Path: blobPath, Size: size,
			UncompressedSize: uint64(size), Chunks: uint32(len(infos)),
			Placed: placed.how,
		}},
	}, nil
}

// indexTar reads the tar's headers into a tree; regular files record the
// offset of their data.
func indexTar(ctx context.Context, r io.ReaderAt, size int64) (*pathTree, error) {
	src := &headerReader{r: r, size: size, buf: make([]byte, 2*pageSize)}
	tr := tar.NewReader(src)
	t := newPathTree()
	prev, end := "", int64(0) // last entry and the end of its data
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		hdr, err := tr.Next()
		if errors.Is(err, tar.ErrInsecurePath) {
			err = nil // only reported under GODEBUG=tarinsecurepath=0; cleanTarPath decides
		}
		if errors.Is(err, io.EOF) {
			// A tar may end right after its last entry's data, without the
			// end-of-archive blocks: umoci writes layers so, and tar and
			// containerd read them. A tar that ends inside that data is
			// truncated.
			if size < end {
				return nil, fmt.Errorf("build: tar truncated inside %q: its data ends at offset %d, the tar at %d", prev, end, size)
			}
			if prev == "" && size < 2*tarfsBlockSize {
				return nil, fmt.Errorf("build: not a tar: %d bytes, no entry and no end-of-archive marker", size)
			}
			return t, nil
		}
		if err != nil {
			if prev == "" {
				return nil, fmt.Errorf("build: tar: first header: %w", err)
			}
			return nil, fmt.Errorf("build: tar: after entry %q: %w", prev, err)
		}
		prev = hdr.Name
		dataOff := src.off
		end = dataOff
		if hdr.Typeflag == tar.TypeReg {
			end += int64(roundUp(uint64(max(hdr.Size, 0)), tarfsBlockSize))
		}
		if err := applyTarEntry(t, hdr, dataOff, size); err != nil {
			return nil, fmt.Errorf("build: tar entry %q: %w", hdr.Name, err)
		}
	}
}

func applyTarEntry(t *pathTree, hdr *tar.Header, dataOff, tarSize int64) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		// archive/tar hands global headers out instead of applying them;
		// only a comment (git archive writes one) is safe to skip.
		for k := range hdr.PAXRecords {
			if k != "comment" {
				return fmt.Errorf("PAX global header record %q is not supported", k)
			}
		}
		return nil
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return errors.New("GNU sparse files are not supported")
		}
	}
	name, err := cleanTarPath(hdr.Name)
	if err != nil {
		return err
	}
	// umoci writes a directory replaced by a file as the file followed by
	// whiteouts of the old directory's entries. Beneath a non-directory of
	// this same layer a whiteout has nothing to delete (the file already
	// hides the lower directory), and extraction skips it; so does the
	// index, which could not place it anyway.
	if strings.HasPrefix(path.Base(name), whiteoutPrefix) && t.underNonDir(name) {
		return nil
	}
	if hdr.Typeflag == tar.TypeLink {
		target, err := cleanTarPath(hdr.Linkname)
		if err != nil {
			return fmt.Errorf("hard link target: %w", err)
		}
		in, ok := t.lookup(target)
		if !ok {
			return fmt.Errorf("hard link target %q not found among earlier entries", hdr.Linkname)
		}
		if in.isDir() {
			return fmt.Errorf("hard link target %q is a directory", hdr.Linkname)
		}
		if name == "" {
			return errors.New("hard link in place of the root directory")
		}
		// link(2) semantics: the new name shares the target's inode and
		// the link header's own metadata does not apply.
		return t.put(name, in)
	}

	in := &inode{}
	m := &in.meta
	if hdr.Uid < 0 || hdr.Gid < 0 || int64(hdr.Uid) > 0xFFFF_FFFF || int64(hdr.Gid) > 0xFFFF_FFFF {
		return fmt.Errorf("uid %d or gid %d out of range", hdr.Uid, hdr.Gid)
	}
	m.UID, m.GID = uint32(hdr.Uid), uint32(hdr.Gid)
	m.Mode = uint32(hdr.Mode) & 0o7777
	m.Mtime, m.MtimeNsec = hdr.ModTime.Unix(), uint32(hdr.ModTime.Nanosecond())
	m.Xattrs = paxXattrs(hdr.PAXRecords)
	switch hdr.Typeflag {
	case tar.TypeReg:
		if hdr.Size < 0 || dataOff+hdr.Size > tarSize {
			return fmt.Errorf("data [%d, +%d) beyond the tar's %d bytes", dataOff, hdr.Size, tarSize)
		}
		if dataOff%tarfsBlockSize != 0 {
			return fmt.Errorf("data at offset %d is not 512-byte aligned", dataOff)
		}
		if (dataOff+hdr.Size)/tarfsBlockSize > 0xFFFF_FFFF {
			return fmt.Errorf("data beyond 2 TiB cannot be addressed in 512-byte blocks")
		}
		m.Mode |= rafs.ModeRegular
		m.Size = uint64(hdr.Size)
		in.dataOff = dataOff
	case tar.TypeDir:
		m.Mode |= rafs.ModeDir
		in.children = make(map[string]*inode)
	case tar.TypeSymlink:
		m.Mode |= rafs.ModeSymlink
		m.Target = hdr.Linkname
	case tar.TypeChar, tar.TypeBlock:
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 0xFFFF_FFFF || hdr.Devminor > 0xFFFF_FFFF {
			return fmt.Errorf("device %d:%d out of range", hdr.Devmajor, hdr.Devminor)
		}
		m.Mode |= map[byte]uint32{tar.TypeChar: rafs.ModeChar, tar.TypeBlock: rafs.ModeBlock}[hdr.Typeflag]
		m.RdevMajor, m.RdevMinor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	case tar.TypeFifo:
		m.Mode |= rafs.ModeFifo
	case tar.TypeGNUSparse:
		return errors.New("GNU sparse files are not supported")
	default:
		return fmt.Errorf("unsupported entry type %q", hdr.Typeflag)
	}
	if err := t.put(name, in); err != nil {
		return err
	}
	return nil
}

// cleanTarPath turns a tar name into a clean path relative to the root (""
// for the root itself), refusing names that climb above it.
func cleanTarPath(name string) (string, error) {
	p := path.Clean(strings.TrimLeft(name, "/"))
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", fmt.Errorf("path %q escapes the root", name)
	}
	if p == "." {
		return "", nil
	}
	return p, nil
}

// paxXattrs extracts SCHILY.xattr.* records.
func paxXattrs(recs map[string]string) map[string][]byte {
	var m map[string][]byte
	for k, v := range recs {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if m == nil {
				m = make(map[string][]byte)
			}
			m[name] = []byte(v)
		}
	}
	return m
}

// headerReader feeds archive/tar from an io.ReaderAt. archive/tar skips
// file data by seeking and then reads only the last byte of the data and
// of the padding, so a window of two pages read at that spot usually also
// holds the next header: one read per entry (or fewer, for small files),
// and at most those two pages of a file's data.
type headerReader struct {
	r      io.ReaderAt
	size   int64
	off    int64 // logical position
	buf    []byte
	bufOff int64
	bufLen int
}

func (h *headerReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if h.off >= h.size {
		return 0, io.EOF
	}
	if h.off < h.bufOff || h.off >= h.bufOff+int64(h.bufLen) {
		if len(p) >= len(h.buf) { // large reads (PAX records) bypass the window
			n, err := h.r.ReadAt(p[:min(int64(len(p)), h.size-h.off)], h.off)
			h.off += int64(n)
			if n > 0 {
				err = nil
			}
			return n, err
		}
		// Whole pages: the page cache hands out pages anyway, and a page
		// often holds several small entries.
		start := h.off &^ (pageSize - 1)
		n, err := h.r.ReadAt(h.buf[:min(int64(len(h.buf)), h.size-start)], start)
		if int64(n) <= h.off-start {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		h.bufOff, h.bufLen = start, n
	}
	n := copy(p, h.buf[h.off-h.bufOff:h.bufLen])
	h.off += int64(n)
	return n, nil
}

func (h *headerReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += h.off
	case io.SeekEnd:
		offset += h.size
	default:
		return 0, errors.New("build: bad whence")
	}
	if offset < 0 {
		return 0, errors.New("build: seek before the start of the tar")
	}
	h.off = offset
	return offset, nil
}

// readerSize finds the byte size behind an io.ReaderAt.
func readerSize(r io.ReaderAt) (int64, error) {
	switch v := r.(type) {
	case interface{ Size() int64 }:
		return v.Size(), nil
	case interface{ Stat() (os.FileInfo, error) }:
		st, err := v.Stat()
		if err != nil {
			return 0, fmt.Errorf("build: %w", err)
		}
		if st.Mode().IsRegular() {
			return st.Size(), nil
		}
	}
	if s, ok := r.(io.Seeker); ok {
		n, err := s.Seek(0, io.SeekEnd)
		if err != nil {
			return 0, fmt.Errorf("build: finding the tar's size: %w", err)
		}
		return n, nil
	}
	return 0, errors.New("build: cannot tell the tar's size: give a file, a *bytes.Reader or an *io.SectionReader")
}

func isHex64(s string) bool {
	return len(s) == 64 && !slices.ContainsFunc([]byte(s), func(c byte) bool {
		return (c < '0' || c > '9') && (c < 'a' || c > 'f')
	})
}
