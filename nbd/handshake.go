package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// errAborted means the client ended the handshake with NBD_OPT_ABORT.
var errAborted = errors.New("nbd: client aborted the handshake")

// handshake is one connection's fixed-newstyle negotiation.
type handshake struct {
	conn      net.Conn
	in        *bufio.Reader
	exports   []Export
	maxReq    uint32
	noZeroes  bool
	out       []byte // reply being built
	optionBuf []byte // current option's data
}

// negotiate runs the handshake and returns the export the client chose with
// NBD_OPT_GO or NBD_OPT_EXPORT_NAME; the connection is then in the
// transmission phase. Any error means the connection must be closed.
func negotiate(conn net.Conn, in *bufio.Reader, exports []Export, maxRequest uint32) (*Export, error) {
	h := &handshake{conn: conn, in: in, exports: exports, maxReq: maxRequest}
	h.out = binary.BigEndian.AppendUint64(h.out[:0], magicNBD)
	h.out = binary.BigEndian.AppendUint64(h.out, magicIHaveOpt)
	h.out = binary.BigEndian.AppendUint16(h.out, flagFixedNewstyle|flagNoZeroes)
	if err := h.flush(); err != nil {
		return nil, err
	}
	var b [4]byte
	if _, err := io.ReadFull(in, b[:]); err != nil {
		return nil, fmt.Errorf("nbd: reading client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(b[:])
	if clientFlags&^knownClientFlags != 0 {
		return nil, fmt.Errorf("nbd: unknown client flags %#x", clientFlags)
	}
	h.noZeroes = clientFlags&clientNoZeroes != 0

	for range maxOptions {
		exp, done, err := h.option()
		if err != nil || done {
			return exp, err
		}
	}
	return nil, fmt.Errorf("nbd: more than %d options in one handshake", maxOptions)
}

func (h *handshake) flush() error {
	if _, err := h.conn.Write(h.out); err != nil {
		return fmt.Errorf("nbd: handshake write: %w", err)
	}
	h.out = h.out[:0]
	return nil
}

// option reads and answers one option. done is true when the handshake is
// over: exp is set for GO and EXPORT_NAME, err is errAborted for ABORT.
func (h *handshake) option() (exp *Export, done bool, err error) {
	var hdr [16]byte
	if _, err := io.ReadFull(h.in, hdr[:]); err != nil {
		return nil, true, fmt.Errorf("nbd: reading option header: %w", err)
	}
	if m := binary.BigEndian.Uint64(hdr[0:8]); m != magicIHaveOpt {
		return nil, true, fmt.Errorf("nbd: option magic %#x, want %#x", m, magicIHaveOpt)
	}
	opt := binary.BigEndian.Uint32(hdr[8:12])
	length := binary.BigEndian.Uint32(hdr[12:16])
	if length > maxOptionLength {
		// Reading that much before answering is what a memory or bandwidth
		// attack wants; no honest option is this long.
		return nil, true, fmt.Errorf("nbd: option %d carries %d bytes, limit %d", opt, length, maxOptionLength)
	}
	if cap(h.optionBuf) < int(length) {
		h.optionBuf = make([]byte, length)
	}
	data := h.optionBuf[:length]
	if _, err := io.ReadFull(h.in, data); err != nil {
		return nil, true, fmt.Errorf("nbd: reading option %d data: %w", opt, err)
	}

	switch opt {
	case optExportName:
		// No error reply exists for EXPORT_NAME: an unknown name can only
		// be answered by closing the connection.
		if len(data) > maxNameLength {
			return nil, true, fmt.Errorf("nbd: EXPORT_NAME of %d bytes exceeds %d", len(data), maxNameLength)
		}
		exp := h.lookup(string(data))
		if exp == nil {
			return nil, true, fmt.Errorf("nbd: EXPORT_NAME %q: no such export", data)
		}
		h.out = binary.BigEndian.AppendUint64(h.out, uint64(exp.Device.Size()))
		h.out = binary.BigEndian.AppendUint16(h.out, ReadOnlyFlags)
		if !h.noZeroes {
			h.out = append(h.out, make([]byte, exportZeroPadding)...)
		}
		return exp, true, h.flush()

	case optAbort:
		// The client may already have gone; the ACK is a courtesy.
		h.reply(opt, repAck, nil)
		_ = h.flush()
		return nil, true, errAborted

	case optList:
		if len(data) != 0 {
			return nil, false, h.replyError(opt, repErrInvalid, "LIST takes no data")
		}
		for i := range h.exports {
			e := &h.exports[i]
			payload := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			payload = append(payload, e.Name...)
			payload = append(payload, e.Description...)
			h.reply(opt, repServer, payload)
		}
		h.reply(opt, repAck, nil)
		return nil, false, h.flush()

	case optInfo, optGo:
		exp, err := h.infoOrGo(opt, data)
		return exp, exp != nil, err

	default:
		// STARTTLS, STRUCTURED_REPLY, META_CONTEXT, EXTENDED_HEADERS and
		// anything unknown: clients fall back to simple replies.
		return nil, false, h.replyError(opt, repErrUnsup, "option not supported")
	}
}

// infoOrGo answers NBD_OPT_INFO or NBD_OPT_GO. It returns the export only for
// a successful GO.
func (h *handshake) infoOrGo(opt uint32, data []byte) (*Export, error) {
	// u32 name length, name, u16 request count, count × u16 info type.
	if len(data) < 6 {
		return nil, h.replyError(opt, repErrInvalid, "option too short")
	}
	nameLen := binary.BigEndian.Uint32(data[0:4])
	if uint64(nameLen) > uint64(len(data)-6) {
		return nil, h.replyError(opt, repErrInvalid, "name length exceeds option length")
	}
	if nameLen > maxNameLength {
		return nil, h.replyError(opt, repErrTooBig, "export name too long")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	count := int(binary.BigEndian.Uint16(rest[0:2]))
	requests := rest[2:]
	if len(requests) != 2*count {
		return nil, h.replyError(opt, repErrInvalid, "information request count does not match option length")
	}
	exp := h.lookup(name)
	if exp == nil {
		return nil, h.replyError(opt, repErrUnknown, "no such export")
	}

	// INFO_EXPORT is mandatory and INFO_BLOCK_SIZE is always useful (it tells
	// clients our 32 MiB limit); name and description only when asked.
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(exp.Device.Size()))
	info = binary.BigEndian.AppendUint16(info, ReadOnlyFlags)
	h.reply(opt, repInfo, info)
	info = binary.BigEndian.AppendUint16(info[:0], infoBlockSize)
	info = binary.BigEndian.AppendUint32(info, 1) // any byte range is served
	info = binary.BigEndian.AppendUint32(info, exp.preferredBlockSize())
	info = binary.BigEndian.AppendUint32(info, h.maxReq)
	h.reply(opt, repInfo, info)
	for i := 0; i < len(requests); i += 2 {
		switch binary.BigEndian.Uint16(requests[i:]) {
		case infoName:
			info = binary.BigEndian.AppendUint16(info[:0], infoName)
			h.reply(opt, repInfo, append(info, exp.Name...))
		case infoDescription:
			if exp.Description != "" {
				info = binary.BigEndian.AppendUint16(info[:0], infoDescription)
				h.reply(opt, repInfo, append(info, exp.Description...))
			}
		}
	}
	h.reply(opt, repAck, nil)
	if err := h.flush(); err != nil {
		return nil, err
	}
	if opt == optGo {
		return exp, nil
	}
	return nil, nil
}

// reply appends one option reply to the output.
func (h *handshake) reply(opt, typ uint32, payload []byte) {
	h.out = binary.BigEndian.AppendUint64(h.out, magicOptionReply)
	h.out = binary.BigEndian.AppendUint32(h.out, opt)
	h.out = binary.BigEndian.AppendUint32(h.out, typ)
	h.out = binary.BigEndian.AppendUint32(h.out, uint32(len(payload)))
	h.out = append(h.out, payload...)
}

// replyError sends an error reply with a human-readable message and keeps
// the handshake going.
func (h *handshake) replyError(opt, typ uint32, msg string) error {
	h.reply(opt, typ, []byte(msg))
	return h.flush()
}

// lookup finds an export by name; the empty name is the default export: the
// one named "" if any, else the first.
func (h *handshake) lookup(name string) *Export {
	for i := range h.exports {
		if h.exports[i].Name == name {
			return &h.exports[i]
		}
	}
	if name == "" && len(h.exports) > 0 {
		return &h.exports[0]
	}
	return nil
}
