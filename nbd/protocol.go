package nbd

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
// All integers on the wire are big-endian. Only what this server speaks is
// listed; see /work/shared/docs/nbd-kernel.md §3–§4 for the full tables.

const (
	// Handshake (fixed newstyle).
	magicNBD            uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt       uint64 = 0x49484156454f5054 // "IHAVEOPT", also the option magic
	magicOptionReply    uint64 = 0x0003e889045565a9
	flagFixedNewstyle   uint16 = 1 << 0 // server handshake flag
	flagNoZeroes        uint16 = 1 << 1 // server handshake flag
	clientFixedNewstyle uint32 = 1 << 0 // client flag
	clientNoZeroes      uint32 = 1 << 1 // client flag
	knownClientFlags           = clientFixedNewstyle | clientNoZeroes

	// Options.
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11

	// Option reply types; errors have bit 31 set.
	repAck            uint32 = 1
	repServer         uint32 = 2
	repInfo           uint32 = 3
	repErrUnsup       uint32 = 1<<31 + 1
	repErrPolicy      uint32 = 1<<31 + 2
	repErrInvalid     uint32 = 1<<31 + 3
	repErrUnknown     uint32 = 1<<31 + 6
	repErrShutdown    uint32 = 1<<31 + 7
	repErrTooBig      uint32 = 1<<31 + 9
	infoExport        uint16 = 0
	infoName          uint16 = 1
	infoDescription   uint16 = 2
	infoBlockSize     uint16 = 3
	exportZeroPadding        = 124 // bytes after an EXPORT_NAME reply without NO_ZEROES

	// Transmission flags (NBD_INFO_EXPORT, NBD_SET_FLAGS, NBD_ATTR_SERVER_FLAGS).
	FlagHasFlags     uint16 = 1 << 0
	FlagReadOnly     uint16 = 1 << 1
	FlagSendFlush    uint16 = 1 << 2
	FlagSendFUA      uint16 = 1 << 3
	FlagRotational   uint16 = 1 << 4
	FlagSendTrim     uint16 = 1 << 5
	FlagSendWriteZ   uint16 = 1 << 6
	FlagSendDF       uint16 = 1 << 7
	FlagCanMultiConn uint16 = 1 << 8
	FlagSendCache    uint16 = 1 << 10

	// ReadOnlyFlags are the transmission flags of every export this package
	// serves: read-only, flush accepted (a no-op), and safe to open several
	// connections to because nothing can change underneath a reader. The
	// kernel-attach path hands the same value to NBD_SET_FLAGS.
	ReadOnlyFlags = FlagHasFlags | FlagReadOnly | FlagSendFlush | FlagCanMultiConn

	// Transmission phase.
	magicRequest      uint32 = 0x25609513
	magicSimpleReply  uint32 = 0x67446698
	requestHeaderSize        = 28
	replyHeaderSize          = 16

	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7

	cmdFlagFUA uint16 = 1 << 0

	// Errors carried in replies (Linux errno values, as the protocol fixes them).
	errPerm     uint32 = 1
	errIO       uint32 = 5
	errInval    uint32 = 22
	errShutdown uint32 = 108
)

// Limits.
const (
	// MaxRequestSize is the largest READ the engine serves by default: the
	// kernel's max_hw_sectors (32 MiB), which clients may raise their soft
	// limit to. Larger requests get EINVAL.
	MaxRequestSize = 32 << 20
	// maxNameLength bounds export names in options and in Export.Name.
	maxNameLength = 4096
	// maxOptionLength bounds one option's payload; a longer one closes the
	// connection, because consuming it would let a client make us read
	// gigabytes before we could answer.
	maxOptionLength = 64 << 10
	// maxOptions bounds how many options one handshake may send.
	maxOptions = 256
)
