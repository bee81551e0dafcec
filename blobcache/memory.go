package blobcache

import (
	"container/list"
	"sync"
)

// memUnits is the store of a memory-only cache: verified, decompressed
// units of all its blobs in one LRU bounded by Options.MemoryLimit. Its
// slices are never modified after put, so a reader may keep one after it
// was evicted.
type memUnits struct {
	mu    sync.Mutex
	limit int64
	used  int64
	lru   list.List // of *memUnit, most recent first
	units map[memKey]*list.Element
}

type memKey struct {
	b  *blob
	id uint32
}

type memUnit struct {
	key  memKey
	data []byte
}

func newMemUnits(limit int64) *memUnits {
	return &memUnits{limit: limit, units: map[memKey]*list.Element{}}
}

func (m *memUnits) has(b *blob, id uint32) bool {
	m.mu.Lock()
	_, ok := m.units[memKey{b, id}]
	m.mu.Unlock()
	return ok
}

// getAll fills the nil entries of got with the kept units of ids, marking
// them recently used, and returns how many are still nil.
func (m *memUnits) getAll(b *blob, ids []uint32, got [][]byte) int {
	missing := 0
	m.mu.Lock()
	for i, id := range ids {
		if got[i] != nil {
			continue
		}
		if el, ok := m.units[memKey{b, id}]; ok {
			m.lru.MoveToFront(el)
			got[i] = el.Value.(*memUnit).data
			continue
		}
		missing++
	}
	m.mu.Unlock()
	return missing
}

// put keeps a unit, evicting the least recently used beyond the limit (but
// never the unit just put).
func (m *memUnits) put(b *blob, id uint32, data []byte) {
	k := memKey{b, id}
	m.mu.Lock()
	defer m.mu.Unlock()
	if el, ok := m.units[k]; ok { // fetched twice: keep the one there
		m.lru.MoveToFront(el)
		return
	}
	m.units[k] = m.lru.PushFront(&memUnit{key: k, data: data})
	m.used += int64(len(data))
	for m.used > m.limit && m.lru.Len() > 1 {
		old := m.lru.Remove(m.lru.Back()).(*memUnit)
		delete(m.units, old.key)
		m.used -= int64(len(old.data))
	}
}

// drop forgets every unit of b (closed).
func (m *memUnits) drop(b *blob) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for el := m.lru.Front(); el != nil; {
		next := el.Next()
		if u := el.Value.(*memUnit); u.key.b == b {
			m.lru.Remove(el)
			delete(m.units, u.key)
			m.used -= int64(len(u.data))
		}
		el = next
	}
}

func (m *memUnits) bytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.used
}
