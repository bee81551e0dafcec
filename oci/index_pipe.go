package oci

import (
	"crypto/sha256"
	"hash"
	"sync"

	"github.com/rafsnbd/rafsnbd/verity"
)

// Index hashes every layer three ways as it streams (the blob's sha256,
// the tar's sha256 for the diff_id, and the sha256 of each 512-byte verity
// block). Inflating is the bottleneck and runs on one goroutine; each hash
// runs on a goroutine of its own, fed through a small ring of chunks, so
// that on the second core it costs the inflater only a copy.
const (
	pipeChunk  = 1 << 20 // a multiple of verityDataBlockSize
	pipeChunks = 4
)

// hashPipe hands what is written to it, in chunks of pipeChunk bytes, to
// consume on a goroutine of its own, in order. Close flushes and waits.
type hashPipe struct {
	full    chan []byte
	free    chan []byte
	cur     []byte
	done    chan struct{}
	once    sync.Once
	consume func([]byte)
}

func newHashPipe(consume func([]byte)) *hashPipe {
	p := &hashPipe{full: make(chan []byte, pipeChunks), free: make(chan []byte, pipeChunks),
		done: make(chan struct{}), consume: consume}
	for range pipeChunks {
		p.free <- make([]byte, 0, pipeChunk)
	}
	go func() {
		defer close(p.done)
		for c := range p.full {
			p.consume(c)
			p.free <- c[:0]
		}
	}()
	return p
}

// Write copies b into the ring; it waits only when the consumer is a
// whole ring behind. Write after Close panics.
func (p *hashPipe) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		if p.cur == nil {
			p.cur = <-p.free
		}
		c := copy(p.cur[len(p.cur):cap(p.cur)], b)
		p.cur, b = p.cur[:len(p.cur)+c], b[c:]
		if len(p.cur) == cap(p.cur) {
			p.full <- p.cur
			p.cur = nil
		}
	}
	return n, nil
}

// Close hands over the last partial chunk and waits until everything was
// consumed. It may be called more than once.
func (p *hashPipe) Close() {
	p.once.Do(func() {
		if len(p.cur) > 0 {
			p.full <- p.cur
			p.cur = nil
		}
		close(p.full)
		<-p.done
	})
}

// pipedHash is a hash.Hash computed behind a hashPipe (for
// downloadReader's blob digest). Sum closes the pipe: write nothing after.
type pipedHash struct {
	hash.Hash
	p *hashPipe
}

func newPipedSHA256() *pipedHash {
	h := sha256.New()
	return &pipedHash{Hash: h, p: newHashPipe(func(b []byte) { h.Write(b) })}
}

func (h *pipedHash) Write(b []byte) (int, error) { return h.p.Write(b) }

func (h *pipedHash) Sum(b []byte) []byte {
	h.p.Close()
	return h.Hash.Sum(b)
}

// close stops the goroutine (on an error path: nothing is summed).
func (h *pipedHash) close() { h.p.Close() }

// leafHasher computes the sha256 of each 512-byte block of what is
// written, behind a hashPipe; a last partial block is left out (a tar is
// whole blocks; mergedVerity takes UncompressedSize/512 of them).
type leafHasher struct {
	p      *hashPipe
	chunks [][]byte
}

func newLeafHasher() *leafHasher {
	l := &leafHasher{}
	// Every chunk but the last is whole blocks, so none straddles two.
	l.p = newHashPipe(func(b []byte) { l.chunks = append(l.chunks, verity.SumBlocks(nil, b, verityDataBlockSize)) })
	return l
}

func (l *leafHasher) Write(b []byte) (int, error) { return l.p.Write(b) }

// leaves closes the pipe and returns the digests, a chunk per pipeChunk
// of input (not joined: mergedVerity packs them as they are).
func (l *leafHasher) leaves() [][]byte {
	l.p.Close()
	return l.chunks
}
