package blobcache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
)

// metaReader reads the few stored ranges of a blob that describe it (the
// chunk-info array and its header, the ToC, the digest section). It serves
// ranges recorded earlier and records what it has to fetch, so that the
// set can be saved in the <id>.meta file and a restart fetches nothing.
//
// The meta file:
//
//	off  size  field
//	0    16    magic "rafsnbd-blobmeta"
//	16   4     version (1)
//	20   4     extent count
//	24   32    fingerprint of the blob entry
//	56   32    sha256 of everything after the header
//	88   ...   extents: offset u64, length u32, then the bytes
type metaReader struct {
	ctx     context.Context
	be      Backend
	extents []metaExtent // sorted by off, non-overlapping
	fetched int          // extents added since load
}

type metaExtent struct {
	off  int64
	data []byte
}

const (
	metaHeaderSize = 88
	metaVersion    = 1
	// maxMetaBytes bounds what one blob's layout may take: a 2^24-entry
	// v2 chunk-info array is 384 MiB, far beyond real blobs.
	maxMetaBytes = 512 << 20
)

var metaMagic = [16]byte([]byte("rafsnbd-blobmeta"))

func (m *metaReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	i := sort.Search(len(m.extents), func(i int) bool {
		e := m.extents[i]
		return e.off+int64(len(e.data)) > off
	})
	if i < len(m.extents) && m.extents[i].off <= off && off+int64(len(p)) <= m.extents[i].off+int64(len(m.extents[i].data)) {
		e := m.extents[i]
		return copy(p, e.data[off-e.off:]), nil
	}
	if m.be == nil {
		return 0, fmt.Errorf("blob bytes [%d, +%d) not recorded", off, len(p))
	}
	if m.size()+len(p) > maxMetaBytes {
		return 0, fmt.Errorf("blob layout needs more than %d bytes", maxMetaBytes)
	}
	buf := make([]byte, len(p))
	n, err := m.be.ReadAt(m.ctx, buf, off)
	if n < len(p) {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return copy(p, buf[:n]), err
	}
	m.add(off, buf)
	return copy(p, buf), nil
}

func (m *metaReader) size() int {
	n := 0
	for _, e := range m.extents {
		n += len(e.data)
	}
	return n
}

// add records a range, merging it with any it overlaps or touches.
func (m *metaReader) add(off int64, data []byte) {
	m.fetched++
	all := append(m.extents, metaExtent{off, data})
	sort.Slice(all, func(i, j int) bool { return all[i].off < all[j].off })
	out := all[:1]
	for _, e := range all[1:] {
		last := &out[len(out)-1]
		end := last.off + int64(len(last.data))
		if e.off > end {
			out = append(out, e)
			continue
		}
		if eEnd := e.off + int64(len(e.data)); eEnd > end {
			merged := make([]byte, eEnd-last.off)
			copy(merged, last.data)
			copy(merged[e.off-last.off:], e.data)
			last.data = merged
		}
	}
	m.extents = out
}

func (m *metaReader) encode(fingerprint [32]byte) []byte {
	var body bytes.Buffer
	for _, e := range m.extents {
		var h [12]byte
		binary.LittleEndian.PutUint64(h[0:], uint64(e.off))
		binary.LittleEndian.PutUint32(h[8:], uint32(len(e.data)))
		body.Write(h[:])
		body.Write(e.data)
	}
	hdr := make([]byte, metaHeaderSize)
	copy(hdr, metaMagic[:])
	binary.LittleEndian.PutUint32(hdr[16:], metaVersion)
	binary.LittleEndian.PutUint32(hdr[20:], uint32(len(m.extents)))
	copy(hdr[24:56], fingerprint[:])
	sum := sha256.Sum256(body.Bytes())
	copy(hdr[56:88], sum[:])
	return append(hdr, body.Bytes()...)
}

// loadMeta reads a meta file made for fingerprint. A missing file is not
// an error (nil extents); a damaged or foreign one is.
func loadMeta(path string, fingerprint [32]byte) ([]metaExtent, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if len(b) < metaHeaderSize || !bytes.Equal(b[:16], metaMagic[:]) ||
		binary.LittleEndian.Uint32(b[16:]) != metaVersion {
		return nil, fmt.Errorf("%s: not a blob meta file", path)
	}
	if !bytes.Equal(b[24:56], fingerprint[:]) {
		return nil, fmt.Errorf("%s: made for another blob entry", path)
	}
	body := b[metaHeaderSize:]
	if sum := sha256.Sum256(body); !bytes.Equal(sum[:], b[56:88]) {
		return nil, fmt.Errorf("%s: checksum mismatch", path)
	}
	n := binary.LittleEndian.Uint32(b[20:])
	var exts []metaExtent
	var prevEnd int64
	for i := uint32(0); i < n; i++ {
		if len(body) < 12 {
			return nil, fmt.Errorf("%s: extent %d truncated", path, i)
		}
		off := int64(binary.LittleEndian.Uint64(body))
		size := int(binary.LittleEndian.Uint32(body[8:]))
		body = body[12:]
		if size > len(body) || off < prevEnd || off > 1<<62 {
			return nil, fmt.Errorf("%s: extent %d malformed", path, i)
		}
		exts = append(exts, metaExtent{off: off, data: body[:size:size]})
		prevEnd = off + int64(size)
		body = body[size:]
	}
	if len(body) != 0 {
		return nil, fmt.Errorf("%s: %d bytes after the last extent", path, len(body))
	}
	return exts, nil
}
