// An independent ROS 2 peer on Fast DDS (ROS 2's default middleware), built with fastddsgen + libfastrtps.
//
// The same job as peer.c, from the same ros2_types.idl: publishes sensor_msgs/Image on rt/camera/image_raw
// (best effort, keep last 1) and std_msgs/String on rt/instruction (reliable, volatile, keep last 10),
// subscribes to geometry_msgs/Twist on rt/cmd_vel (reliable, keep last 1) and sensor_msgs/Image on
// rt/echo/image_raw (best effort, keep last 1). Prints "ready", then "cmd <x> <z>" and
// "image <width> <height> <encoding> <step> <frame_id> <bytes> <sum>" lines; runs until stdin closes.
//
// usage: fast_peer DOMAIN_ID WIDTH HEIGHT. Loopback only: UDPv4 on 127.0.0.1, no multicast, unicast
// discovery with 127.0.0.1 as the initial peer (Fast DDS docs, "Disabling all multicast traffic").
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <thread>
#include <vector>

#include <fastdds/dds/domain/DomainParticipant.hpp>
#include <fastdds/dds/domain/DomainParticipantFactory.hpp>
#include <fastdds/dds/publisher/DataWriter.hpp>
#include <fastdds/dds/publisher/Publisher.hpp>
#include <fastdds/dds/subscriber/DataReader.hpp>
#include <fastdds/dds/subscriber/SampleInfo.hpp>
#include <fastdds/dds/subscriber/Subscriber.hpp>
#include <fastdds/dds/topic/TypeSupport.hpp>
#include <fastdds/rtps/transport/UDPv4TransportDescriptor.h>
#include <fastrtps/utils/IPLocator.h>

#include "ros2_typesPubSubTypes.h"

using namespace eprosima::fastdds::dds;
using eprosima::fastrtps::rtps::IPLocator;
using eprosima::fastrtps::rtps::Locator_t;

namespace {

int fail(const char* what) {
  std::fprintf(stderr, "fast_peer: %s failed\n", what);
  return 2;
}

// Every policy ROS 2 users rely on is stated: a Fast DDS reader defaults to best effort, unlike ROS 2.
template <typename Qos>
void set_qos(Qos& qos, bool reliable, int depth) {
  qos.reliability().kind = reliable ? RELIABLE_RELIABILITY_QOS : BEST_EFFORT_RELIABILITY_QOS;
  qos.durability().kind = VOLATILE_DURABILITY_QOS;
  qos.history().kind = KEEP_LAST_HISTORY_QOS;
  qos.history().depth = depth;
  // Samples larger than the generated type's bound (fastddsgen bounds unbounded sequences at 100
  // elements) need payloads that grow: Fast DDS docs, "MemoryManagementPolicy".
  qos.endpoint().history_memory_policy = eprosima::fastrtps::rtps::PREALLOCATED_WITH_REALLOC_MEMORY_MODE;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s DOMAIN_ID WIDTH HEIGHT\n", argv[0]);
    return 64;
  }
  const int domain = std::atoi(argv[1]);
  const uint32_t width = static_cast<uint32_t>(std::atoi(argv[2]));
  const uint32_t height = static_cast<uint32_t>(std::atoi(argv[3]));

  DomainParticipantQos pqos;
  pqos.transport().use_builtin_transports = false;
  auto udp = std::make_shared<eprosima::fastdds::rtps::UDPv4TransportDescriptor>();
  udp->interfaceWhiteList.push_back("127.0.0.1");
  pqos.transport().user_transports.push_back(udp);
  Locator_t unicast;  // address 0, port 0: the well-known discovery port on the allowed interface
  pqos.wire_protocol().builtin.metatrafficUnicastLocatorList.push_back(unicast);
  Locator_t peer;
  IPLocator::setIPv4(peer, 127, 0, 0, 1);
  pqos.wire_protocol().builtin.initialPeersList.push_back(peer);
  pqos.wire_protocol().builtin.discovery_config.initial_announcements.count = 10;

  DomainParticipant* participant = DomainParticipantFactory::get_instance()->create_participant(domain, pqos);
  if (participant == nullptr) return fail("create_participant");
  TypeSupport image_type(new sensor_msgs::msg::dds_::Image_PubSubType());
  TypeSupport text_type(new std_msgs::msg::dds_::String_PubSubType());
  TypeSupport twist_type(new geometry_msgs::msg::dds_::Twist_PubSubType());
  image_type.register_type(participant);
  text_type.register_type(participant);
  twist_type.register_type(participant);
  Topic* image_topic = participant->create_topic("rt/camera/image_raw", image_type.get_type_name(), TOPIC_QOS_DEFAULT);
  Topic* text_topic = participant->create_topic("rt/instruction", text_type.get_type_name(), TOPIC_QOS_DEFAULT);
  Topic* cmd_topic = participant->create_topic("rt/cmd_vel", twist_type.get_type_name(), TOPIC_QOS_DEFAULT);
  Topic* echo_topic = participant->create_topic("rt/echo/image_raw", image_type.get_type_name(), TOPIC_QOS_DEFAULT);
  if (!image_topic || !text_topic || !cmd_topic || !echo_topic) return fail("create_topic");
  Publisher* publisher = participant->create_publisher(PUBLISHER_QOS_DEFAULT);
  Subscriber* subscriber = participant->create_subscriber(SUBSCRIBER_QOS_DEFAULT);

  DataWriterQos sensor_w = DATAWRITER_QOS_DEFAULT, standard_w = DATAWRITER_QOS_DEFAULT;
  set_qos(sensor_w, false, 1);
  set_qos(standard_w, true, 10);
  DataReaderQos command_r = DATAREADER_QOS_DEFAULT, sensor_r = DATAREADER_QOS_DEFAULT;
  set_qos(command_r, true, 1);
  set_qos(sensor_r, false, 1);
  DataWriter* image_writer = publisher->create_datawriter(image_topic, sensor_w);
  DataWriter* text_writer = publisher->create_datawriter(text_topic, standard_w);
  DataReader* cmd_reader = subscriber->create_datareader(cmd_topic, command_r);
  DataReader* echo_reader = subscriber->create_datareader(echo_topic, sensor_r);
  if (!image_writer || !text_writer || !cmd_reader || !echo_reader) return fail("create writer/reader");

  fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
  std::printf("ready\n");
  std::fflush(stdout);
  const uint32_t step = width * 3;
  std::vector<uint8_t> pixels(static_cast<size_t>(step) * height);
  for (uint32_t count = 1;; count++) {
    char byte;
    if (read(STDIN_FILENO, &byte, 1) == 0) break;  // stdin closed: the test is done

    for (uint32_t y = 0; y < height; y++)
      for (uint32_t x = 0; x < width; x++) {
        uint8_t* p = &pixels[static_cast<size_t>(y) * step + static_cast<size_t>(x) * 3];
        p[0] = static_cast<uint8_t>(x % 256);
        p[1] = static_cast<uint8_t>(y % 256);
        p[2] = static_cast<uint8_t>(count % 256);
      }
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    sensor_msgs::msg::dds_::Image_ image;
    image.header().stamp().sec(static_cast<int32_t>(now.tv_sec));
    image.header().stamp().nanosec(static_cast<uint32_t>(now.tv_nsec));
    image.header().frame_id("fast_peer_camera");
    image.height(height);
    image.width(width);
    image.encoding("rgb8");
    image.step(step);
    image.data(pixels);
    if (!image_writer->write(&image)) return fail("write(Image)");
    std_msgs::msg::dds_::String_ text;
    text.data("pick up the red cube");
    if (!text_writer->write(&text)) return fail("write(String)");

    geometry_msgs::msg::dds_::Twist_ twist;
    SampleInfo info;
    while (cmd_reader->take_next_sample(&twist, &info) == ReturnCode_t::RETCODE_OK)
      if (info.valid_data) std::printf("cmd %.17g %.17g\n", twist.linear().x(), twist.angular().z());
    sensor_msgs::msg::dds_::Image_ echo;
    while (echo_reader->take_next_sample(&echo, &info) == ReturnCode_t::RETCODE_OK) {
      if (!info.valid_data) continue;
      uint32_t sum = 0;
      for (uint8_t v : echo.data()) sum += v;
      std::printf("image %u %u %s %u %s %zu %u\n", echo.width(), echo.height(), echo.encoding().c_str(),
                  echo.step(), echo.header().frame_id().c_str(), echo.data().size(), sum);
    }
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  participant->delete_contained_entities();
  DomainParticipantFactory::get_instance()->delete_participant(participant);
  return 0;
}
