package rafs

import (
	"container/list"
	"io"
	"sync"

	"github.com/rafsnbd/rafsnbd/internal/readat"
)

// metaCache keeps recently read 4 KiB pages of the bootstrap. Inodes,
// their xattrs and chunk indexes, and directory blocks are small reads
// packed close together; walking a tree reads each page many times, and
// one ReadAt per page instead of per inode makes Walk and Lookup several
// times faster on a file. Reads larger than a few pages bypass it.
type metaCache struct {
	r    io.ReaderAt
	size int64

	mu    sync.Mutex
	lru   *list.List // of *metaPage, most recent first
	pages map[int64]*list.Element
}

type metaPage struct {
	idx  int64
	data []byte // metaPageSize bytes, or fewer for the bootstrap's last page
}

const (
	metaPageSize     = 4096
	metaCachePages   = 256 // 1 MiB per image
	metaCacheMaxRead = 4 * metaPageSize
)

func newMetaCache(r io.ReaderAt, size int64) *metaCache {
	return &metaCache{r: r, size: size, lru: list.New(), pages: map[int64]*list.Element{}}
}

// readAt fills p from off; off+len(p) must not exceed the bootstrap size.
func (c *metaCache) readAt(p []byte, off int64) error {
	if len(p) > metaCacheMaxRead {
		_, err := readat.Full(c.r, p, off)
		return err
	}
	for len(p) > 0 {
		idx := off / metaPageSize
		page, err := c.page(idx)
		if err != nil {
			return err
		}
		in := off - idx*metaPageSize
		if in >= int64(len(page)) {
			return io.ErrUnexpectedEOF
		}
		n := copy(p, page[in:])
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (c *metaCache) page(idx int64) ([]byte, error) {
	c.mu.Lock()
	if el, ok := c.pages[idx]; ok {
		c.lru.MoveToFront(el)
		data := el.Value.(*metaPage).data
		c.mu.Unlock()
		return data, nil
	}
	c.mu.Unlock()
	// Concurrent misses on one page both read it; the second insert wins
	// harmlessly, as both hold the same bytes.
	data := make([]byte, min(metaPageSize, c.size-idx*metaPageSize))
	if _, err := readat.Full(c.r, data, idx*metaPageSize); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.pages[idx]; ok {
		c.lru.MoveToFront(el)
		return el.Value.(*metaPage).data, nil
	}
	c.pages[idx] = c.lru.PushFront(&metaPage{idx: idx, data: data})
	if c.lru.Len() > metaCachePages {
		old := c.lru.Remove(c.lru.Back()).(*metaPage)
		delete(c.pages, old.idx)
	}
	return data, nil
}
