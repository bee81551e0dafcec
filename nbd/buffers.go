package nbd

import (
	"math/bits"
	"sync"
)

// bufferPool hands out data buffers in power-of-two size classes from 4 KiB
// to MaxRequestSize, so that the request path reuses memory instead of
// allocating per request. Pointers to slices are pooled so that Put does
// not allocate an interface box.
type bufferPool struct {
	classes [numBufferClasses]sync.Pool
}

const (
	minBufferShift   = 12 // 4 KiB
	maxBufferShift   = 25 // 32 MiB = MaxRequestSize
	numBufferClasses = maxBufferShift - minBufferShift + 1
)

// bufferClass returns the size class holding n bytes (1 <= n <= 32 MiB).
func bufferClass(n int) int {
	if n <= 1<<minBufferShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufferShift
}

// get returns a buffer with len == cap >= n. n must be at most MaxRequestSize.
func (p *bufferPool) get(n int) *[]byte {
	c := bufferClass(n)
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 1<<(c+minBufferShift))
	return &b
}

// put returns a buffer obtained from get.
func (p *bufferPool) put(b *[]byte) {
	p.classes[bufferClass(cap(*b))].Put(b)
}

// bufferSize is the size of the buffer get returns for n bytes.
func bufferSize(n int) int64 { return 1 << (bufferClass(n) + minBufferShift) }

// byteBudget bounds the bytes of data buffers held at once, so that a client
// that asks for many large reads and does not take the replies cannot make
// the server hold more than the budget. acquire and release do not
// allocate.
type byteBudget struct {
	mu    sync.Mutex
	freed sync.Cond
	avail int64
}

func newByteBudget(n int64) *byteBudget {
	b := &byteBudget{avail: n}
	b.freed.L = &b.mu
	return b
}

// acquire waits until n bytes are available and takes them. n must not
// exceed the budget's total.
func (b *byteBudget) acquire(n int64) {
	b.mu.Lock()
	for b.avail < n {
		b.freed.Wait()
	}
	b.avail -= n
	b.mu.Unlock()
}

// tryAcquire takes n bytes if they are available now.
func (b *byteBudget) tryAcquire(n int64) bool {
	b.mu.Lock()
	ok := b.avail >= n
	if ok {
		b.avail -= n
	}
	b.mu.Unlock()
	return ok
}

func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	b.avail += n
	b.mu.Unlock()
	b.freed.Broadcast()
}
