// Package readat holds the one rule for reading all of a range through
// io.ReaderAt.
package readat

import (
	"errors"
	"io"
)

// Full reads len(p) bytes at off. Only a complete read succeeds, even when
// r reports io.EOF with a full buffer (which io.ReaderAt allows); a short
// read is io.ErrUnexpectedEOF, or r's own error if it gave another one.
func Full(r io.ReaderAt, p []byte, off int64) (int, error) {
	n, err := r.ReadAt(p, off)
	return Complete(n, len(p), err)
}

// Complete applies Full's rule to the result (n, err) of one read of want
// bytes, for readers that are not an io.ReaderAt (such as a read with a
// context).
func Complete(n, want int, err error) (int, error) {
	if n == want {
		return n, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}
