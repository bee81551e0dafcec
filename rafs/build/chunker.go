package build

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// The directory-mode data path. A reader goroutine cuts files into chunks in
// a fixed order; workers digest and compress them in parallel; the caller's
// goroutine takes them back in the same order, drops repeats, and appends
// the rest to the blob. Only the middle step runs out of order, so the blob
// is the same whatever the number of workers.

// chunkJob is one chunk on its way through the pipeline.
type chunkJob struct {
	file  *inode
	index int    // chunk number within the file
	data  []byte // uncompressed bytes (a pooled buffer)
	buf   *[]byte

	digest [32]byte
	packed []byte // compressed bytes, nil when stored raw
	pbuf   *[]byte
	err    error
	done   chan struct{}
}

// blobWriter appends chunks to a temporary file in the blob directory and
// tracks the chunk-info array.
type blobWriter struct {
	opts  *Options
	f     *atomicfile.File // write errors name the blob dir, not the temporary
	w     *bufio.Writer
	sum   hash.Hash
	coff  uint64 // bytes written so far
	uoff  uint64 // next uncompressed offset (4 KiB aligned)
	seen  map[[32]byte]uint32
	infos []rafs.ChunkInfo // the blob's distinct chunks, in ci order
	// prior holds the chunks of earlier layers' blobs (LayerBuilder):
	// a chunk found there is referenced, not stored again. This blob is
	// then blob index len(prior.blobs) of the layer's bootstrap.
	prior *priorChunks
}

// writeDirBlob chunks the regular files (each visited once, in order),
// sets their Chunks, and writes the blob under a temporary name: the
// caller commits it once the bootstrap is written, or removes it. It
// returns nil blob info when there is no data at all.
func writeDirBlob(ctx context.Context, files []*inode, opts *Options) (*rafs.BlobInfo, *Blob, *placedTar, error) {
	if err := os.MkdirAll(opts.BlobDir, 0o755); err != nil {
		return nil, nil, nil, fmt.Errorf("build: %w", err)
	}
	f, err := newBlobTemp(opts.BlobDir)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("build: %w", err)
	}
	bw := &blobWriter{
		opts:  opts,
		f:     f,
		sum:   sha256.New(),
		seen:  make(map[[32]byte]uint32),
		prior: opts.prior,
	}
	bw.w = bufio.NewWriterSize(io.MultiWriter(f, bw.sum), 1<<20)
	info, blob, err := bw.run(ctx, files)
	if err != nil || blob == nil {
		f.Close()
		os.Remove(f.Name())
		return nil, nil, nil, err
	}
	return info, blob, &placedTar{tmp: f.Name(), dir: opts.BlobDir, id: blob.ID, owned: true, mode: opts.BlobMode}, nil
}

func (bw *blobWriter) run(ctx context.Context, files []*inode) (*rafs.BlobInfo, *Blob, error) {
	chunkSize := int(bw.opts.ChunkSize)
	bufs := sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}
	pbufs := sync.Pool{New: func() any { b := make([]byte, 0, chunkSize); return &b }}

	inflight := 2*bw.opts.Workers + 2
	work := make(chan *chunkJob, inflight)
	ordered := make(chan *chunkJob, inflight)
	g, gctx := errgroup.WithContext(ctx)

	g.Go(func() error { // reader
		defer close(work)
		defer close(ordered)
		for _, in := range files {
			if err := readChunks(gctx, in, chunkSize, &bufs, work, ordered); err != nil {
				return err
			}
		}
		return nil
	})
	for range bw.opts.Workers {
		g.Go(func() error {
			for job := range work {
				bw.process(job, &pbufs)
				close(job.done)
			}
			return nil
		})
	}
	g.Go(func() error { // collector: the only writer of the blob
		for job := range ordered {
			select {
			case <-job.done:
			case <-gctx.Done():
				return gctx.Err()
			}
			if job.err != nil {
				return job.err
			}
			err := bw.add(job)
			bufs.Put(job.buf)
			if job.pbuf != nil {
				pbufs.Put(job.pbuf)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	if len(bw.infos) == 0 {
		return nil, nil, nil
	}
	return bw.finish()
}

// readChunks cuts one file into jobs, handing each to the workers and, in
// order, to the collector.
func readChunks(ctx context.Context, in *inode, chunkSize int, bufs *sync.Pool, work, ordered chan<- *chunkJob) error {
	var f io.Reader
	if in.tar != nil {
		f = io.NewSectionReader(in.tar, in.dataOff, int64(in.meta.Size))
	} else {
		osf, err := os.Open(in.srcPath)
		if err != nil {
			return fmt.Errorf("build: %w", err)
		}
		defer osf.Close()
		f = osf
	}
	size := in.meta.Size
	for k := 0; uint64(k)*uint64(chunkSize) < size; k++ {
		n := int(min(uint64(chunkSize), size-uint64(k)*uint64(chunkSize)))
		buf := bufs.Get().(*[]byte)
		job := &chunkJob{file: in, index: k, data: (*buf)[:n], buf: buf, done: make(chan struct{})}
		if _, err := io.ReadFull(f, job.data); err != nil {
			bufs.Put(buf)
			return fmt.Errorf("build: %s: file shrank while building (%d bytes expected): %w", in.srcPath, size, err)
		}
		for _, ch := range []chan<- *chunkJob{ordered, work} {
			select {
			case ch <- job:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	var one [1]byte
	if n, _ := f.Read(one[:]); n > 0 {
		return fmt.Errorf("build: %s: file grew while building (%d bytes expected)", in.srcPath, size)
	}
	return nil
}

func (bw *blobWriter) process(job *chunkJob, pbufs *sync.Pool) {
	job.digest = bw.opts.Digester.Sum(job.data)
	if bw.opts.Compressor == rafs.CompressNone {
		return
	}
	pbuf := pbufs.Get().(*[]byte)
	out, err := rafs.Compress(bw.opts.Compressor, (*pbuf)[:0], job.data)
	switch {
	case errors.Is(err, rafs.ErrNotSmaller):
		pbufs.Put(pbuf)
	case err != nil:
		pbufs.Put(pbuf)
		job.err = fmt.Errorf("build: %s: chunk %d: %w", job.file.srcPath, job.index, err)
	default:
		*pbuf = out // keep a grown buffer for the next chunk
		job.packed, job.pbuf = out, pbuf
	}
}

// add records one chunk of a file, appending it to the blob unless an
// identical chunk is already there.
func (bw *blobWriter) add(job *chunkJob) error {
	ci, ok := bw.seen[job.digest]
	if !ok && bw.prior != nil {
		if pc, found := bw.prior.chunks[job.digest]; found {
			job.file.meta.Chunks = append(job.file.meta.Chunks, rafs.NewChunkIndex(pc.blob, pc.ci, uint32(pc.uoff>>rafs.BlockSizeBitsDefault)))
			return nil
		}
	}
	if !ok {
		if len(bw.infos) > rafs.MaxCIIndex {
			return fmt.Errorf("build: more than 2^24 distinct chunks in one blob")
		}
		stored, flags := job.data, uint32(0)
		if job.packed != nil {
			stored, flags = job.packed, rafs.ChunkFlagCompressed
		}
		if bw.coff+uint64(len(stored)) > 1<<40 || bw.uoff+uint64(len(job.data)) > 1<<44 {
			return fmt.Errorf("build: blob exceeds the chunk-info address range")
		}
		if _, err := bw.w.Write(stored); err != nil {
			return fmt.Errorf("build: writing blob: %w", err)
		}
		ci = uint32(len(bw.infos))
		bw.seen[job.digest] = ci
		bw.infos = append(bw.infos, rafs.ChunkInfo{
			Digest:             job.digest,
			Flags:              flags,
			CompressedSize:     uint32(len(stored)),
			UncompressedSize:   uint32(len(job.data)),
			CompressedOffset:   bw.coff,
			UncompressedOffset: bw.uoff,
			FileOffset:         uint64(job.index) * uint64(bw.opts.ChunkSize),
			Index:              ci,
		})
		bw.coff += uint64(len(stored))
		bw.uoff = roundUp(bw.uoff+uint64(len(job.data)), 4096)
	}
	blk := bw.infos[ci].UncompressedOffset >> rafs.BlockSizeBitsDefault
	job.file.meta.Chunks = append(job.file.meta.Chunks, rafs.NewChunkIndex(bw.prior.ownIndex(), ci, uint32(blk)))
	return nil
}

// finish appends the chunk-info array and its header, and names the blob.
func (bw *blobWriter) finish() (*rafs.BlobInfo, *Blob, error) {
	ciOff := bw.coff
	ci := make([]byte, rafs.CIv1EntrySize*len(bw.infos))
	for i, c := range bw.infos {
		bc := rafs.BlobChunk{CompressedOffset: c.CompressedOffset, CompressedSize: c.CompressedSize,
			UncompressedOffset: c.UncompressedOffset, UncompressedSize: c.UncompressedSize, Flags: c.Flags}
		if err := rafs.EncodeCIv1(ci[rafs.CIv1EntrySize*i:], bc); err != nil {
			return nil, nil, fmt.Errorf("build: chunk %d: %w", i, err)
		}
	}
	hdr := rafs.BlobMetaHeader{
		Magic:              rafs.BlobMetaMagic,
		Features:           rafs.BlobFeatureAligned,
		CICompressor:       rafs.CompressNone,
		CIEntries:          uint32(len(bw.infos)),
		CIOffset:           ciOff,
		CICompressedSize:   uint64(len(ci)),
		CIUncompressedSize: uint64(len(ci)),
		Magic2:             rafs.BlobMetaMagic,
	}
	hb := make([]byte, rafs.BlobMetaHeaderSize)
	hdr.Encode(hb)
	for _, b := range [][]byte{ci, hb} {
		if _, err := bw.w.Write(b); err != nil {
			return nil, nil, fmt.Errorf("build: writing blob: %w", err)
		}
	}
	if err := bw.w.Flush(); err != nil {
		return nil, nil, fmt.Errorf("build: writing blob: %w", err)
	}
	if err := bw.f.Close(); err != nil {
		return nil, nil, fmt.Errorf("build: writing blob: %w", err)
	}
	id := hex.EncodeToString(bw.sum.Sum(nil))
	size := int64(ciOff) + int64(len(ci)) + rafs.BlobMetaHeaderSize
	path := filepath.Join(bw.opts.BlobDir, id) // once committed
	entry := rafs.BlobEntry{
		ChunkCount:         uint32(len(bw.infos)),
		Compressor:         bw.opts.Compressor,
		Digester:           bw.opts.Digester,
		Features:           rafs.BlobFeatureAligned,
		CompressedSize:     uint64(size),
		UncompressedSize:   bw.uoff,
		CICompressor:       rafs.CompressNone,
		CIOffset:           ciOff,
		CICompressedSize:   uint64(len(ci)),
		CIUncompressedSize: uint64(len(ci)),
	}
	info := &rafs.BlobInfo{ID: id, Entry: entry, Chunks: bw.infos}
	blob := &Blob{ID: id, Path: path, Size: size, UncompressedSize: bw.uoff, Chunks: uint32(len(bw.infos))}
	return info, blob, nil
}

func roundUp(v, align uint64) uint64 { return (v + align - 1) / align * align }
