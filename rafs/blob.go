package rafs

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

// Blob-side parsing (§11): a data blob's chunk-info array and its ToC.
// Serving a blob's uncompressed space (decompression, digest checks,
// caching) is package blobcache's job; rafs only decodes.

// ciFeatureMask are the blob features that change how the chunk-info array
// is decoded; the blob meta header must agree with the blob table on them.
const ciFeatureMask = BlobFeatureAligned | BlobFeatureChunkInfoV2 | BlobFeatureZran | BlobFeatureBatch | BlobFeatureEncrypted

// ReadBlobChunks reads the chunk-info array of a non-tarfs data blob: the
// ci_compressed_size bytes at ci_offset, decompressed with ci_compressor,
// then checked against the 4 KiB blob meta header that follows them
// (magics, and every ci_* field equal to the blob table entry's). The
// returned chunks are in ci order (index = ci index of chunk indexes) and
// are validated: uncompressed ranges sorted, non-overlapping and inside
// uncompressed_size; compressed ranges inside compressed_size.
//
// Tarfs blobs have no chunk-info array; for them ReadBlobChunks returns
// nil, nil. ZRAN, batch and encrypted blobs are reported as
// errors.ErrUnsupported.
func ReadBlobChunks(blob io.ReaderAt, e *BlobEntry) ([]BlobChunk, error) {
	s := fmt.Sprintf("blob %s", e.ID())
	if e.IsTarfs() {
		return nil, nil
	}
	if f := e.Features & (BlobFeatureZran | BlobFeatureBatch | BlobFeatureEncrypted); f != 0 {
		return nil, fmt.Errorf("rafs: %s: features %#x (zran, batch or encrypted chunks): %w", s, f, errors.ErrUnsupported)
	}
	if e.ChunkCount > MaxChunksPerBlob {
		return nil, formatErr(-1, s, "chunk_count", e.ChunkCount, "more than 2^24 chunks")
	}
	entSize := uint64(CIv1EntrySize)
	if e.Features&BlobFeatureChunkInfoV2 != 0 {
		entSize = CIv2EntrySize
	}
	if e.CIUncompressedSize != uint64(e.ChunkCount)*entSize {
		return nil, formatErr(-1, s, "ci_uncompressed_size", e.CIUncompressedSize, "must be %d chunks × %d bytes", e.ChunkCount, entSize)
	}
	if e.CICompressor > CompressZstd {
		return nil, formatErr(-1, s, "ci_compressor", uint32(e.CICompressor), "unknown compressor")
	}
	if e.CICompressor == CompressNone && e.CICompressedSize != e.CIUncompressedSize {
		return nil, formatErr(-1, s, "ci_compressed_size", e.CICompressedSize, "uncompressed chunk info must be %d bytes", e.CIUncompressedSize)
	}
	if e.CICompressedSize > e.CIUncompressedSize && e.CIUncompressedSize > 0 {
		// lz4/zstd/gzip framing of a tiny array can exceed it, but not by
		// more than a header; nydus refuses any growth.
		return nil, formatErr(-1, s, "ci_compressed_size", e.CICompressedSize, "larger than ci_uncompressed_size %d", e.CIUncompressedSize)
	}
	hdrOff, carry := bits.Add64(e.CIOffset, e.CICompressedSize, 0)
	if carry != 0 || hdrOff > maxBlobCompressedSize {
		return nil, formatErr(-1, s, "ci_offset", e.CIOffset, "ci_offset + ci_compressed_size overflows")
	}
	// Read the header first: if it is there, so are the bytes before it,
	// which bounds the allocation below by the blob's real size.
	hb, err := readBlob(blob, hdrOff, BlobMetaHeaderSize, s, "blob meta header")
	if err != nil {
		return nil, err
	}
	var h BlobMetaHeader
	h.Decode(hb)
	ho := int64(hdrOff)
	hs := s + " meta header"
	switch {
	case h.Magic != BlobMetaMagic:
		return nil, formatErr(ho, hs, "magic", h.Magic, "want %#x", BlobMetaMagic)
	case h.Magic2 != BlobMetaMagic:
		return nil, formatErr(ho+4092, hs, "magic2", h.Magic2, "want %#x", BlobMetaMagic)
	case h.Features&ciFeatureMask != e.Features&ciFeatureMask:
		return nil, formatErr(ho+4, hs, "features", h.Features, "disagrees with the blob table's features %#x", e.Features)
	case h.CICompressor != e.CICompressor:
		return nil, formatErr(ho+8, hs, "ci_compressor", uint32(h.CICompressor), "blob table says %d", e.CICompressor)
	case h.CIEntries != e.ChunkCount:
		return nil, formatErr(ho+12, hs, "ci_entries", h.CIEntries, "blob table says %d chunks", e.ChunkCount)
	case h.CIOffset != e.CIOffset:
		return nil, formatErr(ho+16, hs, "ci_offset", h.CIOffset, "blob table says %d", e.CIOffset)
	case h.CICompressedSize != e.CICompressedSize:
		return nil, formatErr(ho+24, hs, "ci_compressed_size", h.CICompressedSize, "blob table says %d", e.CICompressedSize)
	case h.CIUncompressedSize != e.CIUncompressedSize:
		return nil, formatErr(ho+32, hs, "ci_uncompressed_size", h.CIUncompressedSize, "blob table says %d", e.CIUncompressedSize)
	}
	packed, err := readBlob(blob, e.CIOffset, e.CICompressedSize, s, "chunk info")
	if err != nil {
		return nil, err
	}
	raw := packed
	if e.CICompressor != CompressNone {
		raw = make([]byte, e.CIUncompressedSize)
		if err := Decompress(e.CICompressor, raw, packed); err != nil {
			return nil, &FormatError{Off: int64(e.CIOffset), Struct: s, Field: "chunk info", Msg: err.Error()}
		}
	}
	chunks := make([]BlobChunk, e.ChunkCount)
	var prevEnd uint64
	for i := range chunks {
		c := &chunks[i]
		if entSize == CIv2EntrySize {
			*c = DecodeCIv2(raw[uint64(i)*entSize:])
		} else {
			*c = DecodeCIv1(raw[uint64(i)*entSize:])
		}
		if err := checkBlobChunk(e, c, i, prevEnd, s); err != nil {
			return nil, err
		}
		prevEnd = c.UncompressedOffset + uint64(c.UncompressedSize)
	}
	return chunks, nil
}

func checkBlobChunk(e *BlobEntry, c *BlobChunk, i int, prevEnd uint64, s string) error {
	f := fmt.Sprintf("chunk %d", i)
	switch {
	case c.Flags&^uint32(ChunkFlagCompressed|ChunkFlagHasCRC32) != 0:
		return formatErr(-1, s, f+" flags", c.Flags, "zran, batch or encrypted chunk in a blob without those features")
	case c.UncompressedSize == 0 || c.CompressedSize == 0:
		return formatErr(-1, s, f+" size", c.CompressedSize, "empty chunk")
	case c.UncompressedSize > MaxChunkSize:
		// A blob entry may leave its chunk size 0; a reader still must
		// not allocate gigabytes for one chunk.
		return formatErr(-1, s, f+" uncompressed size", c.UncompressedSize, "larger than the largest chunk size %d", MaxChunkSize)
	case e.ChunkSize != 0 && c.UncompressedSize > e.ChunkSize:
		return formatErr(-1, s, f+" uncompressed size", c.UncompressedSize, "larger than the blob's chunk size %d", e.ChunkSize)
	case c.UncompressedOffset < prevEnd:
		return formatErr(-1, s, f+" uncompressed offset", c.UncompressedOffset, "overlaps or precedes the previous chunk (ends at %d)", prevEnd)
	case c.UncompressedOffset > e.UncompressedSize || uint64(c.UncompressedSize) > e.UncompressedSize-c.UncompressedOffset:
		return formatErr(-1, s, f+" uncompressed offset", c.UncompressedOffset,
			"%d bytes run past the uncompressed size %d", c.UncompressedSize, e.UncompressedSize)
	case c.CompressedOffset > e.CompressedSize || uint64(c.CompressedSize) > e.CompressedSize-c.CompressedOffset:
		return formatErr(-1, s, f+" compressed offset", c.CompressedOffset,
			"%d bytes run past the compressed size %d", c.CompressedSize, e.CompressedSize)
	case !c.Compressed() && c.CompressedSize != c.UncompressedSize:
		return formatErr(-1, s, f+" size", c.CompressedSize, "stored raw but sizes differ")
	case c.Compressed() && e.Compressor == CompressNone:
		return formatErr(-1, s, f+" flags", c.Flags, "compressed chunk in a blob without compressor")
	}
	return nil
}

// readBlob reads exactly n bytes at off of a blob; a short blob is a
// FormatError naming what was being read.
func readBlob(r io.ReaderAt, off, n uint64, s, what string) ([]byte, error) {
	if off > 1<<62 || n > 1<<40 {
		return nil, formatErr(off, s, what, n, "range beyond any blob")
	}
	buf := make([]byte, n)
	if n == 0 {
		return buf, nil
	}
	got, err := r.ReadAt(buf, int64(off))
	if got == len(buf) {
		return buf, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return nil, formatErr(off, s, what, n, "blob ends after %d of these bytes", got)
	}
	return nil, fmt.Errorf("rafs: %s: reading %s at %d: %w", s, what, off, err)
}

// DecodeBlobTOC decodes the ToC of blob e from its last e.TOCSize bytes,
// which must hash to e.TOCDigest; the tar header that follows the entries
// in a HAS_TAR_HEADER blob is skipped. Errors name the ToC's offset in the
// blob.
func DecodeBlobTOC(e *BlobEntry, toc []byte) ([]BlobTOCEntry, error) {
	s := fmt.Sprintf("blob %s ToC", e.ID())
	off := int64(e.CompressedSize) - int64(len(toc))
	if uint64(len(toc)) != uint64(e.TOCSize) {
		return nil, formatErr(off, s, "blob_toc_size", e.TOCSize, "have %d bytes", len(toc))
	}
	if sum := sha256.Sum256(toc); sum != e.TOCDigest {
		return nil, formatErr(off, s, "blob_toc_digest", hex.EncodeToString(e.TOCDigest[:]), "the ToC's sha256 is %x", sum)
	}
	if e.Features&BlobFeatureHasTarHeader != 0 {
		if len(toc) < BlobTOCTarHeaderSize {
			return nil, formatErr(off, s, "blob_toc_size", e.TOCSize, "no room for the ToC's %d-byte tar header", BlobTOCTarHeaderSize)
		}
		toc = toc[:len(toc)-BlobTOCTarHeaderSize]
	}
	if len(toc)%BlobTOCEntrySize != 0 {
		return nil, formatErr(off, s, "blob_toc_size", e.TOCSize, "not whole %d-byte entries", BlobTOCEntrySize)
	}
	out := make([]BlobTOCEntry, len(toc)/BlobTOCEntrySize)
	for i := range out {
		out[i].Decode(toc[i*BlobTOCEntrySize:])
	}
	return out, nil
}
